#!/usr/bin/env python
"""Train or evaluate with LazyConfig (python) configs: detectron2's tools/lazyconfig_train_net.py
with RandWire checkpoints and exact resume.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/demo/randwire_frcnn_demo.py
    python tools/lazyconfig_train_net.py --config-file configs/lazy/randwire_frcnn.py --num-gpus 8 --resume
    python tools/lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=model_final.pth

The config has detectron2's layout (configs/lazy/common/train.py): ``model``,
``dataloader.{train,test,evaluator}``, ``optimizer`` (``params.model`` is set here),
``lr_multiplier`` and ``train``, plus ``train.seed``. Trailing ``key=value`` overrides.
Differences from detectron2's script, as in tools/train_net.py:

* checkpoints are written by ``RandWireCheckpointer`` (graph specs in every checkpoint,
  atomic writes, weights trained on other graphs refused);
* with a ``ResumableTrainLoader`` (configs/lazy/common/data) and ``train.seed``, ``--resume``
  continues exactly as an uninterrupted run (``ExactResumeHook``: data stream position,
  per-step RNG seeds, smoothed-metric history);
* CPU runs (``train.device=cpu``, ``--num-gpus N`` CPU processes over gloo), AMP turned off
  off CUDA, and the final metrics written to ``train.output_dir/final_metrics.json``.
"""
import inspect
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import randwire_d2  # noqa: E402,F401  (registers datasets and components)
import torch  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.engine import (  # noqa: E402
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.engine.defaults import create_ddp_model  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.registry import locate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from randwire_d2.checkpoint import RandWireCheckpointer  # noqa: E402
from randwire_d2.precision import PrecisionTrainer, precision_for  # noqa: E402
from randwire_d2.data.resumable import ResumableTrainLoader  # noqa: E402
from randwire_d2.engine import (  # noqa: E402
    ExactResumeHook,
    _ddp_for_cpu_models,
    builtin_dataset_hint,
    write_results,
)
from randwire_d2.launch import launch  # noqa: E402
from randwire_d2.modeling import RandWireNet  # noqa: E402

logger = logging.getLogger("randwire_d2")


_ABSENT = object()


def _takes_argument(target, name: str) -> bool:
    """Whether a LazyCall target (callable or its dotted name) has a parameter ``name``."""
    try:
        target = locate(target) if isinstance(target, str) else target
        params = inspect.signature(target).parameters.values()
    except Exception:  # cannot tell: let instantiate() decide
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def check_override_keys(cfg, overrides) -> None:
    """Refuse ``key=value`` overrides of keys the config does not have (OmegaConf would add
    them silently, so a typo would change nothing); a LazyCall's omitted optional
    arguments (parameters of its target) may be set."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key or key[0] in "+~":  # hydra's explicit add / delete
            continue
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT:
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None, throw_on_resolution_failure=False) if parent_key else cfg
        if OmegaConf.is_dict(parent) and "_target_" in parent and _takes_argument(parent["_target_"], leaf):
            continue
        known = sorted(k for k in parent.keys() if k != "_target_") if OmegaConf.is_dict(parent) else []
        raise KeyError(
            f"Non-existent config key: {key} (command-line override {item!r})"
            + (f"; {parent_key or 'the config'} has {known}" if known else "")
        )


def load_config(config_file: str, opts=()):
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file!r} does not exist.")
    if not config_file.endswith(".py"):
        raise ValueError(
            f"--config-file {config_file!r} is not a LazyConfig (.py) file: yaml configs go to tools/train_net.py."
        )
    cfg = LazyConfig.load(config_file)
    check_override_keys(cfg, opts)
    return LazyConfig.apply_overrides(cfg, list(opts))


def _randwire_nets(node, path="model"):
    """(path, config) of every L(RandWireNet)(...) in a model config."""
    if OmegaConf.is_dict(node):
        target = node.get("_target_")
        if target is RandWireNet or target == f"{RandWireNet.__module__}.{RandWireNet.__name__}":
            yield path, node
        for key, value in node.items_ex(resolve=False):
            yield from _randwire_nets(value, f"{path}.{key}")


def check_train_settings(cfg, resume: bool = False) -> None:
    """The yaml path's checks (randwire_d2.engine.check_run_settings) on train.*."""
    device = str(cfg.train.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device = {device!r} but no CUDA device is available: add train.device=cpu.")
    weights = cfg.train.init_checkpoint
    resuming = resume and os.path.isfile(os.path.join(cfg.train.output_dir, "last_checkpoint"))
    if weights and "://" not in weights and not os.path.isfile(weights) and not resuming:
        raise ValueError(
            f"train.init_checkpoint = {weights!r}: no such file. Pretrain with configs/lazy/imagenet/*.py and "
            'convert with tools/convert_pretrained.py, or pass train.init_checkpoint="" to train from scratch.'
        )
    if not weights:
        for path, net in _randwire_nets(cfg.model):
            if net.get("norm") == "FrozenBN":
                raise ValueError(
                    f"{path}.norm = 'FrozenBN' with no train.init_checkpoint freezes randomly initialised "
                    f"statistics: to train from scratch set {path}.norm to 'BN', 'SyncBN' or 'GN' and "
                    f"{path}.freeze_at=0."
                )
    if cfg.train.amp.enabled and not device.startswith("cuda"):
        logger.warning("train.amp.enabled is set but train.device is not CUDA: train.amp.precision decides "
                       "('auto': fp32 on CPU).")
        cfg.train.amp.enabled = False
    train_precision(cfg)  # names train.amp.precision if it is wrong


def train_precision(cfg) -> str:
    return precision_for(cfg.train.amp.get("precision", "auto"), cfg.train.device, cfg.train.amp.enabled,
                         "train.amp.precision")


def do_test(cfg, model):
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
        write_results(cfg.train.output_dir, results)
    return results


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    with _ddp_for_cpu_models():
        model = create_ddp_model(model, **cfg.train.ddp)
    # train.amp.precision (randwire_d2/precision.py): detectron2's AMPTrainer knows only fp16
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
    cfg = load_config(args.config_file, args.opts)
    check_train_settings(cfg, resume=args.resume)
    default_setup(cfg, args)  # also seeds the RNGs from train.seed (random if < 0)
    if cfg.train.get("seed", -1) < 0:  # one random data-stream seed for all processes
        cfg.train.seed = int(comm.shared_random_seed())
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        with _ddp_for_cpu_models():
            model = create_ddp_model(model)
        RandWireCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume
        )
        return do_test(cfg, model)
    do_train(args, cfg)
    return None


def launch_from_args(args):
    # read the config once here: a bad file or override fails before any process starts,
    # and train.device picks the backend (NCCL on GPUs, gloo on CPU)
    device = load_config(args.config_file, args.opts).train.device
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=device,
    )


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        launch_from_args(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # ours name the key, file or value
        if os.environ.get("RANDWIRE_DEBUG") or (isinstance(exc, KeyError) and "Non-existent" not in str(exc)):
            raise
        sys.exit(f"error: {exc}\n(set RANDWIRE_DEBUG=1 for the traceback)")
