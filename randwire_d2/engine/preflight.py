"""Checks run by the launching process before any worker starts: a mistake in the
config, paths, counts, devices, periods, schedules or dataset class lists is one
error naming the key and what is allowed, whatever ``--num-gpus`` (in a worker it
would come back wrapped in torch's ``ProcessRaisedException``)."""
import os
import tempfile

import torch

from detectron2.data import DatasetCatalog

from ..config import is_classification
from .defaults import derive_settings
from .errors import one_line
from .launch import uses_cuda
from .run_settings import check_run_settings

__all__ = ["check_before_launch", "check_output_dir_writable"]


def check_output_dir_writable(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=output_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"cfg.OUTPUT_DIR = {output_dir!r} is not a writable folder: {one_line(exc)}") from None


def _check_counts(args, cfg) -> None:
    for flag, value in (("--num-gpus", args.num_gpus), ("--num-machines", args.num_machines)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} {value!r} is invalid: an integer >= 1.")
    if uses_cuda(cfg.MODEL.DEVICE) and args.num_gpus > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible: use at "
            "most that many, or MODEL.DEVICE cpu for CPU processes."
        )


def _check_datasets(cfg, eval_only: bool) -> None:
    registered = set(DatasetCatalog.list())
    if not eval_only and not cfg.DATASETS.TRAIN:
        raise ValueError("cfg.DATASETS.TRAIN is empty: name at least one registered dataset.")
    for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for name in names:
            if name not in registered:
                known = sorted(registered)
                raise ValueError(
                    f"cfg.{key} = {list(names)}: dataset {name!r} is not registered (registered: "
                    f"{', '.join(known[:12])}{', ...' if len(known) > 12 else ''}); register it before training."
                )


def _check_model(cfg) -> None:
    if is_classification(cfg) or str(cfg.MODEL.BACKBONE.NAME).startswith("build_randwire"):
        from ..config import randwire_kwargs

        randwire_kwargs(cfg)  # MODEL.RANDWIRE.*, graph files


def check_before_launch(cfg, args) -> None:
    """Raise ValueError for the first setting that would fail or mislead the run."""
    _check_counts(args, cfg)
    check_run_settings(cfg, resume=args.resume, world_size=args.num_gpus * args.num_machines)
    _check_model(cfg)
    _check_datasets(cfg, args.eval_only)
    check_output_dir_writable(cfg.OUTPUT_DIR)
    if is_classification(cfg):
        from ..data.classification import check_classification_datasets

        if not args.eval_only:
            derive_settings(cfg.clone())  # epoch schedules: lists the training data
        check_classification_datasets(cfg)
