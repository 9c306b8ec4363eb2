"""What ``tools/lazyconfig_train_net.py`` runs (LazyConfig configs): detectron2's
lazyconfig training loop with RandWire checkpoints, exact resume (``ExactResumeHook``
with a ``ResumableTrainLoader``), CPU DDP, and the final metrics written to
``train.output_dir/final_metrics.json``."""
import logging
import os

from detectron2.config import instantiate
from detectron2.engine import default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..checkpoint import RandWireCheckpointer
from ..data.resumable import ResumableTrainLoader
from .datasets import builtin_dataset_hint
from .hooks import ExactResumeHook
from .launch import launch, uses_cuda
from .lazy_config import check_override_keys, check_train_settings, load_config, train_precision  # noqa: F401  (re-exported)
from .precision import PrecisionTrainer
from .errors import run_command
from .preemption import StopHook, stop_on_signals
from .provenance import describe_weights, training_weights
from .results import write_results
from .slurm import add_slurm_arguments, submit
from .trainer import ddp_for_cpu_models

__all__ = ["argument_parser", "do_test", "do_train", "launch_from_args", "main", "run"]

logger = logging.getLogger("randwire_d2")


def argument_parser():
    from detectron2.engine import default_argument_parser

    return add_slurm_arguments(default_argument_parser())


def do_test(cfg, model, weights=None):
    """``weights``: describe_weights() of what is evaluated (default: the training's)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    try:
        test_loader = instantiate(cfg.dataloader.test)
    except FileNotFoundError as exc:
        hint = builtin_dataset_hint(exc)
        if hint:
            raise FileNotFoundError(f"dataloader.test: {exc}.{hint}") from exc
        raise
    results = inference_on_dataset(model, test_loader, instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process() and results:
        print_csv_format(results)
        write_results(cfg.train.output_dir, results, weights=weights or training_weights(cfg.train.output_dir))
    return results


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    with ddp_for_cpu_models():
        model = create_ddp_model(model, **cfg.train.ddp)
    # train.amp.precision (precision.py): detectron2's AMPTrainer knows only fp16
    trainer = PrecisionTrainer(model, train_loader, optim, train_precision(cfg), cfg.train.device)
    checkpointer = RandWireCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    if isinstance(train_loader, ResumableTrainLoader):
        resume_hook = ExactResumeHook(loader=train_loader)
    else:
        logger.warning("dataloader.train is not a ResumableTrainLoader: resuming is not exact.")
        resume_hook = ExactResumeHook(seed=cfg.train.seed)
    trainer.register_hooks(
        [
            resume_hook,
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period
            )
            if comm.is_main_process()
            else None,
            StopHook(checkpointer),  # last: SIGTERM/SIGUSR1/SIGINT checkpoint the finished iteration
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # the checkpoint stores the iteration that just finished
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if isinstance(train_loader, ResumableTrainLoader):
        train_loader.start_iter = start_iter
        if start_iter:
            logger.info(f"Training data resumes at global batch {start_iter} (seed {train_loader.seed}).")
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def main(args):
    with stop_on_signals():  # SIGTERM/SIGUSR1/SIGINT: checkpoint the iteration, raise RunStopped
        return _main(args)


def _main(args):
    cfg = load_config(args.config_file, args.opts)
    check_train_settings(cfg, resume=args.resume)
    default_setup(cfg, args)  # also seeds the RNGs from train.seed (random if < 0)
    if cfg.train.get("seed", -1) < 0:  # one random data-stream seed for all processes
        cfg.train.seed = int(comm.shared_random_seed())
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        with ddp_for_cpu_models():
            model = create_ddp_model(model)
        # evaluation loads every tensor of the checkpoint, or refuses
        checkpointer = RandWireCheckpointer(model, save_dir=cfg.train.output_dir, complete=True)
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
        loaded = checkpointer.get_checkpoint_file() if args.resume and checkpointer.has_checkpoint() else None
        return do_test(cfg, model, weights=describe_weights(loaded or cfg.train.init_checkpoint))
    do_train(args, cfg)
    return None


def launch_from_args(args):
    # read the config once here: a bad file or override fails before any process starts,
    # and train.device picks the backend (NCCL on GPUs, gloo on CPU)
    cfg = load_config(args.config_file, args.opts)
    device = cfg.train.device
    if getattr(args, "launcher", "local") == "slurm":  # one job of --nodes x --gpus-per-node tasks
        check_train_settings(cfg, resume=args.resume)
        job = submit(main, args, cfg.train.output_dir, uses_cuda(device))
        print(f"submitted SLURM job {job.job_id}: logs in {os.path.join(cfg.train.output_dir, 'submitit')}")
        return job
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=device,
    )


def run(args) -> None:
    """launch_from_args for the command line (:func:`.errors.run_command`): one ``error:``
    line on a failure, one line and exit status 128 + signal on a stop signal."""
    run_command(launch_from_args, args)
