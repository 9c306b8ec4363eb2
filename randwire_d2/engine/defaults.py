"""Setup of a yaml-config run, as detectron2.engine.defaults does it: args -> cfg
(detectron2 defaults + ours + file + command line), settings derived from others
(epoch schedules, LR scaling, AMP off without CUDA), logging."""
import logging
import os
from typing import List

from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm

from ..config import add_classification_config, add_randwire_config, check_config_bases, is_classification
from ..data.custom import check_detection_datasets, register_custom_datasets, resolve_num_classes
from .errors import hide_console_tracebacks
from .provenance import setup_eval_only
from .run_settings import amp_needs_cuda, check_run_settings

__all__ = ["DERIVED", "derive_settings", "setup", "setup_cfg", "setup_logging"]

logger = logging.getLogger("randwire_d2")


def setup_cfg(config_file: str, opts=()):
    """cfg = detectron2 defaults + MODEL.RANDWIRE + file + command-line opts."""
    cfg = get_cfg()
    add_randwire_config(cfg)
    add_classification_config(cfg)
    if config_file is None:  # the defaults only
        return cfg
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--config-file {config_file!r} does not exist.")
        check_config_bases(config_file)
        cfg.merge_from_file(config_file)
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"Command-line config options must be KEY VALUE pairs; got an odd number: {opts}")
    try:
        cfg.merge_from_list(opts)
    except AssertionError as exc:  # yacs reports a command-line typo as an assertion
        if str(exc).startswith("Non-existent key: "):
            raise KeyError(f"Non-existent config key: {str(exc)[len('Non-existent key: '):]} (command line)") from None
        raise
    register_custom_datasets(cfg)  # DATASETS.COCO_JSON / VOC: here, so in every process
    if not is_classification(cfg):
        message = resolve_num_classes(cfg)  # NUM_CLASSES 0: the training data's count
        if message:
            logger.info(message)
    return cfg


# settings the code may replace, and what replaces them
DERIVED = {
    "SOLVER.BASE_LR": "SOLVER.LR_PER_256 x IMS_PER_BATCH / 256",
    "SOLVER.MAX_ITER": "SOLVER.EPOCHS",
    "SOLVER.WARMUP_ITERS": "SOLVER.WARMUP_EPOCHS",
    "SOLVER.CHECKPOINT_PERIOD": "SOLVER.CHECKPOINT_EPOCHS",
    "TEST.EVAL_PERIOD": "TEST.EVAL_EPOCHS",
    "SOLVER.AMP.ENABLED": "no CUDA device: SOLVER.AMP.PRECISION 'auto' trains in fp32 on CPU",
}


def _get_key(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def derive_settings(cfg) -> List[str]:
    """Resolve the settings computed from others (epoch schedules, LR scaling, AMP off
    without CUDA) in a defrosted ``cfg``; return one message per setting that changed."""
    before = {key: _get_key(cfg, key) for key in DERIVED}
    if is_classification(cfg):
        from ..solver import resolve_schedule

        resolve_schedule(cfg)
    if amp_needs_cuda(cfg):
        cfg.SOLVER.AMP.ENABLED = False
    defaults = setup_cfg(None)
    messages = []
    for key, why in DERIVED.items():
        old, new = before[key], _get_key(cfg, key)
        if old != new:
            given = "" if old == _get_key(defaults, key) else " (set in the config/command line)"
            messages.append(f"{key} = {old!r}{given} is replaced by {new!r}: {why}")
    return messages


def setup_logging(cfg) -> None:
    """randwire_d2's own logger to the console and OUTPUT_DIR/log.txt like detectron2's;
    tracebacks only to the log file (unless RANDWIRE_DEBUG=1)."""
    from detectron2.utils.logger import setup_logger

    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="randwire_d2", abbrev_name="rw")
    logging.getLogger("randwire_d2").propagate = True  # and to the root's handlers, if any (pytest's caplog)
    hide_console_tracebacks()


def setup(args):
    cfg = setup_cfg(args.config_file, args.opts)
    moved = setup_eval_only(cfg, args.resume, args.eval_only)
    check_run_settings(cfg, resume=args.resume)
    if not is_classification(cfg):
        check_detection_datasets(cfg, eval_only=args.eval_only)
    changes = moved + derive_settings(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logging(cfg)
    for message in changes:  # now that logging is set up
        logger.warning(message)
    return cfg
