"""What ``tools/train_net.py`` runs (yaml configs): its argument parser, the checks and
OUTPUT_DIR lock before any process starts, the launch, and each process's ``main``
(train, or ``--eval-only``); :func:`error_line` is the one-line message of a failed run."""
import contextlib

from detectron2.engine import default_argument_parser

from ..checkpoint import RandWireCheckpointer
from ..config import is_classification
from ..data.custom import check_detection_datasets
from .defaults import setup, setup_cfg
from .errors import TrainingError, WorkerError, log_failure, one_line
from .launch import launch
from .output_dir import OutputDirLock, check_existing_results
from .preflight import check_before_launch
from .trainer import Trainer

__all__ = ["argument_parser", "error_line", "launch_from_args", "main"]


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start a new run in an OUTPUT_DIR that holds a previous run's checkpoints: deletes them and its "
        "metrics first (without it, such a run is refused; --resume continues it)",
    )
    return parser


def main(args):
    try:
        cfg = setup(args)
        if args.eval_only:
            model = Trainer.build_model(cfg)
            RandWireCheckpointer(
                model, save_dir=cfg.OUTPUT_DIR, partial_weights=cfg.MODEL.RANDWIRE.PARTIAL_WEIGHTS
            ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
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


def error_line(exc: BaseException) -> str:
    where = " (traceback: RANDWIRE_DEBUG=1"
    if isinstance(exc, (TrainingError, WorkerError)):
        where += ", or OUTPUT_DIR/log.txt"
    return f"error: {one_line(exc)}{where})"
