"""What ``tools/train_net.py`` runs (yaml configs): its argument parser, the checks and
OUTPUT_DIR lock before any process starts, the launch, and each process's ``main``
(train, or ``--eval-only``); :func:`.errors.error_line` is the one-line message of a failed run,
:func:`run` the command line's exit (one line, status 1 on failure, 128 + signal on a stop
signal). ``--launcher slurm`` submits the run as one SLURM job instead (:mod:`.slurm`)."""
import contextlib
import os

from detectron2.engine import default_argument_parser

from ..checkpoint import RandWireCheckpointer
from ..config import is_classification
from ..data.custom import check_detection_datasets
from .defaults import setup, setup_cfg
from .errors import error_line, log_failure, run_command  # noqa: F401  (error_line re-exported)
from .launch import launch, uses_cuda
from .output_dir import OutputDirLock, check_existing_results
from .preemption import stop_on_signals
from .preflight import check_before_launch
from .provenance import check_checkpoint_classes
from .slurm import add_slurm_arguments, submit
from .trainer import Trainer

__all__ = ["argument_parser", "error_line", "launch_from_args", "main", "run", "submit_to_slurm"]


def argument_parser():
    parser = add_slurm_arguments(default_argument_parser())
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start a new run in an OUTPUT_DIR that holds a previous run's checkpoints: deletes them and its "
        "metrics first (without it, such a run is refused; --resume continues it)",
    )
    return parser


def main(args):
    with stop_on_signals():  # SIGTERM/SIGUSR1/SIGINT: checkpoint the iteration, raise RunStopped
        return _main(args)


def _main(args):
    try:
        cfg = setup(args)
        if args.eval_only:  # setup() resolved the weights (--resume: the last checkpoint) into MODEL.WEIGHTS
            model = Trainer.build_model(cfg)
            checkpointer = RandWireCheckpointer(model, complete=True)  # every tensor, or refused
            checkpointer.load(cfg.MODEL.WEIGHTS)
            check_checkpoint_classes(cfg, checkpointer.loaded_class_names, cfg.MODEL.WEIGHTS)
            return Trainer.test(cfg, model)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    except Exception as exc:
        log_failure(exc)
        raise


def _dist_url(args) -> str:
    """detectron2's default URL is a fixed port per user: on one machine, pick a free one."""
    default = default_argument_parser().get_default("dist_url")
    if args.num_machines == 1 and args.dist_url in ("auto", default):
        return "auto"
    return args.dist_url


def launch_from_args(args):
    """Check the settings, lock OUTPUT_DIR, then run ``main`` in ``args.num_gpus`` processes
    per machine (GPUs, or CPU processes with MODEL.DEVICE cpu) on ``args.num_machines`` machines."""
    cfg = setup_cfg(args.config_file, args.opts)
    if getattr(args, "launcher", "local") == "slurm":
        return submit_to_slurm(args, cfg)
    check_before_launch(cfg, args)
    if args.num_gpus * args.num_machines > 1 and not is_classification(cfg):
        check_detection_datasets(cfg, eval_only=args.eval_only)  # one clear error, not one per worker
    # machine 0 owns OUTPUT_DIR (only global rank 0 writes checkpoints); evaluation only reads them
    owns_output = not args.eval_only and args.machine_rank == 0
    with OutputDirLock(cfg.OUTPUT_DIR) if owns_output else contextlib.nullcontext():
        if owns_output:
            check_existing_results(
                cfg.OUTPUT_DIR, resume=args.resume, overwrite=getattr(args, "overwrite", False),
                weights=cfg.MODEL.WEIGHTS,
            )
        return launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=_dist_url(args),
            args=(args,),
            device=cfg.MODEL.DEVICE,
        )


def submit_to_slurm(args, cfg):
    """--launcher slurm: the checks here, then one job of --nodes x --gpus-per-node tasks;
    returns the submitit job."""
    args.num_gpus, args.num_machines, args.machine_rank = args.gpus_per_node, args.nodes, 0
    check_before_launch(cfg, args)
    if not is_classification(cfg):
        check_detection_datasets(cfg, eval_only=args.eval_only)
    if not args.eval_only:
        check_existing_results(cfg.OUTPUT_DIR, resume=args.resume, overwrite=getattr(args, "overwrite", False),
                               weights=cfg.MODEL.WEIGHTS)
    job = submit(main, args, cfg.OUTPUT_DIR, uses_cuda(cfg.MODEL.DEVICE))
    print(f"submitted SLURM job {job.job_id}: {args.nodes} node(s) x {args.gpus_per_node} process(es); logs in "
          f"{os.path.join(cfg.OUTPUT_DIR, 'submitit')} and {os.path.join(cfg.OUTPUT_DIR, 'log.txt')}")
    return job


def run(args) -> None:
    """launch_from_args for the command line (:func:`.errors.run_command`)."""
    run_command(launch_from_args, args)
