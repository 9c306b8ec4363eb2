"""Validation of the run settings (SOLVER.*, DATALOADER.*, TEST.*, INPUT.*, MODEL.PIXEL_*)
before anything is built: a wrong value raises ``ValueError("cfg.KEY = value is invalid:
allowed ...")`` here instead of an exception deep inside torch or detectron2 later
(a zero CHECKPOINT_PERIOD dividing by zero at the first step, negative NUM_WORKERS in
the DataLoader, an unknown scheduler name, ...).

Only what this plugin's training path consumes is checked; keys it ignores (test-time
augmentation of classification, keypoint settings, ...) are left alone.
:func:`check_run_settings` adds the checks that look beyond the values (the device,
MODEL.WEIGHTS on disk, norms a multi-process CPU run cannot use, FrozenBN from scratch).
"""
import math
import os
from functools import reduce
from typing import Optional

import torch

from detectron2.utils import comm

from ..config import is_classification
from .precision import resolve_precision

__all__ = ["amp_needs_cuda", "check_run_settings", "check_run_values"]

WARMUP_METHODS = ("linear", "constant")
OPTIMIZERS = ("SGD", "AdamW")
CLIP_TYPES = ("value", "norm")
FLIPS = ("horizontal", "vertical", "none")
CROP_TYPES = ("relative_range", "relative", "absolute", "absolute_range")
SIZE_SAMPLING = ("choice", "range", "range_by_clipping")
FORMATS = ("BGR", "RGB")
CLS_AUGS = ("random_resized_crop", "pad_crop")
CLS_DECODES = ("auto", "cpu", "device")


def _lr_schedulers():
    """The scheduler names this detectron2 knows (HEAD adds WarmupStepWithFixedGammaLR)."""
    import inspect

    from detectron2.solver import build

    names = ["WarmupMultiStepLR", "WarmupCosineLR"]
    if "WarmupStepWithFixedGammaLR" in inspect.getsource(build.build_lr_scheduler):
        names.append("WarmupStepWithFixedGammaLR")
    return tuple(names)


def _samplers(cfg):
    names = ["TrainingSampler", "RepeatFactorTrainingSampler"]
    if _has(cfg, "DATALOADER.RANDOM_SUBSET_RATIO"):  # HEAD (v0.6 has the sampler, not its key)
        names.append("RandomSubsetTrainingSampler")
    return tuple(names)


def _get(cfg, key):
    return reduce(lambda node, k: node[k], key.split("."), cfg)


def _has(cfg, key) -> bool:
    try:
        _get(cfg, key)
    except KeyError:
        return False
    return True


def _fail(key, value, allowed):
    raise ValueError(f"cfg.{key} = {value!r} is invalid: {allowed}.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(cfg, key, low, high=None):
    v = _get(cfg, key)
    if not (_is_int(v) and v >= low and (high is None or v <= high)):
        _fail(key, v, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))
    return v


def _num(cfg, key, low=0.0, high=None, low_open=False, high_open=False):
    v = _get(cfg, key)
    ok = _is_num(v) and (v > low if low_open else v >= low)
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        _fail(key, v, f"a finite number in {lo}{low:g}, {high:g}{hi}" if high is not None
              else f"a finite number {'>' if low_open else '>='} {low:g}")
    return v


def _choice(cfg, key, allowed):
    v = _get(cfg, key)
    if not isinstance(v, str) or v not in allowed:
        _fail(key, v, f"allowed are {list(allowed)}")
    return v


def _bool(cfg, key):
    v = _get(cfg, key)
    if not isinstance(v, bool):
        _fail(key, v, "True or False")
    return v


def _ints(cfg, key, low, min_len=1, increasing=False):
    v = _get(cfg, key)
    ok = isinstance(v, (list, tuple)) and len(v) >= min_len and all(_is_int(x) and x >= low for x in v)
    if ok and increasing:
        ok = all(a < b for a, b in zip(v, v[1:]))
    if not ok:
        what = "strictly increasing " if increasing else ""
        _fail(key, v, f"a list of {what}integers >= {low}" + (f" (at least {min_len})" if min_len > 1 else ""))
    return list(v)


def _check_solver(cfg, world_size):
    _choice(cfg, "SOLVER.LR_SCHEDULER_NAME", _lr_schedulers())
    epochs = _num(cfg, "SOLVER.EPOCHS") if _has(cfg, "SOLVER.EPOCHS") else 0.0
    if _has(cfg, "SOLVER.WARMUP_EPOCHS"):
        _num(cfg, "SOLVER.WARMUP_EPOCHS")
        _num(cfg, "SOLVER.CHECKPOINT_EPOCHS")
    lr_per_256 = _num(cfg, "SOLVER.LR_PER_256") if _has(cfg, "SOLVER.LR_PER_256") else 0.0
    if not epochs:
        _int(cfg, "SOLVER.MAX_ITER", 1)
    if not lr_per_256:
        _num(cfg, "SOLVER.BASE_LR", 0.0, low_open=True)
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupCosineLR":
        _ints(cfg, "SOLVER.STEPS", 1, min_len=0, increasing=True)
        _num(cfg, "SOLVER.GAMMA", 0.0, low_open=True)
    _int(cfg, "SOLVER.WARMUP_ITERS", 0)
    _num(cfg, "SOLVER.WARMUP_FACTOR", 0.0, 1.0)
    _choice(cfg, "SOLVER.WARMUP_METHOD", WARMUP_METHODS)
    _int(cfg, "SOLVER.CHECKPOINT_PERIOD", 1)
    optimizer = _choice(cfg, "SOLVER.OPTIMIZER", OPTIMIZERS) if _has(cfg, "SOLVER.OPTIMIZER") else "SGD"
    if optimizer == "SGD":
        momentum = _num(cfg, "SOLVER.MOMENTUM", 0.0, 1.0, high_open=True)
        if _bool(cfg, "SOLVER.NESTEROV") and momentum == 0:
            _fail("SOLVER.NESTEROV", True, "Nesterov needs SOLVER.MOMENTUM > 0")
    else:
        betas = cfg.SOLVER.BETAS
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_num(b) and 0 <= b < 1 for b in betas)):
            _fail("SOLVER.BETAS", betas, "two numbers in [0, 1)")
    _num(cfg, "SOLVER.WEIGHT_DECAY")
    _num(cfg, "SOLVER.WEIGHT_DECAY_NORM")
    _num(cfg, "SOLVER.BIAS_LR_FACTOR")
    if _get(cfg, "SOLVER.WEIGHT_DECAY_BIAS") is not None:
        _num(cfg, "SOLVER.WEIGHT_DECAY_BIAS")
    _bool(cfg, "SOLVER.AMP.ENABLED")
    if _bool(cfg, "SOLVER.CLIP_GRADIENTS.ENABLED"):
        clip = _choice(cfg, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", CLIP_TYPES)
        _num(cfg, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.0, low_open=True)
        norm = cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE
        if clip == "norm" and not (isinstance(norm, (int, float)) and not isinstance(norm, bool) and norm > 0):
            _fail("SOLVER.CLIP_GRADIENTS.NORM_TYPE", norm, "a number > 0 (inf for the max norm)")
    batch = cfg.SOLVER.IMS_PER_BATCH
    if not _is_int(batch) or batch <= 0 or batch % world_size:
        raise ValueError(
            f"cfg.SOLVER.IMS_PER_BATCH = {batch!r} must be a positive multiple of the number of processes "
            f"({world_size}): it is the total batch over all of them."
        )
    reference = _int(cfg, "SOLVER.REFERENCE_WORLD_SIZE", 0)
    if reference and batch % reference:
        _fail("SOLVER.REFERENCE_WORLD_SIZE", reference, f"0, or a divisor of SOLVER.IMS_PER_BATCH ({batch})")


def _check_data(cfg):
    _int(cfg, "DATALOADER.NUM_WORKERS", 0)
    _bool(cfg, "DATALOADER.ASPECT_RATIO_GROUPING")
    _bool(cfg, "DATALOADER.FILTER_EMPTY_ANNOTATIONS")
    sampler = _choice(cfg, "DATALOADER.SAMPLER_TRAIN", _samplers(cfg))
    if sampler == "RepeatFactorTrainingSampler":
        _num(cfg, "DATALOADER.REPEAT_THRESHOLD", 0.0, low_open=True)
    elif sampler == "RandomSubsetTrainingSampler":
        _num(cfg, "DATALOADER.RANDOM_SUBSET_RATIO", 0.0, 1.0, low_open=True)
    if _has(cfg, "DATALOADER.CLS_PREFETCH_FACTOR"):
        _int(cfg, "DATALOADER.CLS_PREFETCH_FACTOR", 1)
    _int(cfg, "TEST.EVAL_PERIOD", 0)
    _int(cfg, "TEST.DETECTIONS_PER_IMAGE", 1)
    if _has(cfg, "TEST.IMS_PER_BATCH"):
        _int(cfg, "TEST.IMS_PER_BATCH", 1)
    if _has(cfg, "TEST.EVAL_EPOCHS"):
        _num(cfg, "TEST.EVAL_EPOCHS")
    if _bool(cfg, "TEST.PRECISE_BN.ENABLED"):
        _int(cfg, "TEST.PRECISE_BN.NUM_ITER", 1)
    _choice(cfg, "INPUT.FORMAT", FORMATS)
    _choice(cfg, "INPUT.RANDOM_FLIP", FLIPS)
    for key in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"):
        v = _get(cfg, key)
        positive = key.endswith("STD")
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_num(x) and (x > 0 or not positive) for x in v)):
            _fail(key, v, "three finite numbers (one per RGB/BGR channel)" + (", all > 0" if positive else ""))


def _check_detection_input(cfg):
    sampling = _choice(cfg, "INPUT.MIN_SIZE_TRAIN_SAMPLING", SIZE_SAMPLING)
    sizes = _ints(cfg, "INPUT.MIN_SIZE_TRAIN", 1, min_len=2 if sampling != "choice" else 1)
    if sampling != "choice" and len(sizes) != 2:
        _fail("INPUT.MIN_SIZE_TRAIN", sizes, f"two sizes (min, max) with MIN_SIZE_TRAIN_SAMPLING {sampling!r}")
    _int(cfg, "INPUT.MAX_SIZE_TRAIN", 1)
    _int(cfg, "INPUT.MIN_SIZE_TEST", 0)
    _int(cfg, "INPUT.MAX_SIZE_TEST", 1)
    _choice(cfg, "INPUT.MASK_FORMAT", ("polygon", "bitmask"))
    if _bool(cfg, "INPUT.CROP.ENABLED"):
        kind = _choice(cfg, "INPUT.CROP.TYPE", CROP_TYPES)
        size = cfg.INPUT.CROP.SIZE
        ok = isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_num(s) and s > 0 for s in size)
        if ok and kind.startswith("relative"):
            ok = all(s <= 1 for s in size)
        elif ok:
            ok = all(_is_int(s) for s in size) and (kind != "absolute_range" or size[0] <= size[1])
        if not ok:
            allowed = "two fractions in (0, 1]" if kind.startswith("relative") else "two positive integers"
            _fail("INPUT.CROP.SIZE", size, f"{allowed} for INPUT.CROP.TYPE {kind!r}")


def _check_classification_input(cfg):
    crop = _int(cfg, "INPUT.CROP_SIZE", 1)
    resize = _int(cfg, "INPUT.RESIZE_SIZE", 1)
    if resize < crop:
        _fail("INPUT.RESIZE_SIZE", resize, f"an integer >= INPUT.CROP_SIZE ({crop})")
    _choice(cfg, "INPUT.CLS_TRAIN_AUG", CLS_AUGS)
    scale = cfg.INPUT.CLS_CROP_SCALE
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(_is_num(s) for s in scale)
            and 0 < scale[0] <= scale[1] <= 1):
        _fail("INPUT.CLS_CROP_SCALE", scale, "(min, max) with 0 < min <= max <= 1")
    _int(cfg, "INPUT.CLS_PAD", 0)
    if _has(cfg, "INPUT.CLS_DECODE"):
        _choice(cfg, "INPUT.CLS_DECODE", CLS_DECODES)


def check_run_values(cfg, world_size: int = 1, classification: bool = False) -> None:
    """Raise ValueError naming the first invalid run setting and what is allowed."""
    _check_solver(cfg, world_size)
    _check_data(cfg)
    if classification:
        _check_classification_input(cfg)
    else:
        _check_detection_input(cfg)


def check_run_settings(cfg, resume: bool = False, world_size: Optional[int] = None) -> None:
    """Refuse settings that would fail deep inside torch or train a broken model.
    ``world_size``: the number of processes (default: the current process group's)."""
    device = str(cfg.MODEL.DEVICE)
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"cfg.MODEL.DEVICE = {device!r} is invalid: 'cpu', 'cuda' or 'cuda:N'.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"cfg.MODEL.DEVICE = {device!r} but no CUDA device is available: add MODEL.DEVICE cpu.")
    world = comm.get_world_size() if world_size is None else world_size
    check_run_values(cfg, world_size=world, classification=is_classification(cfg))
    resolve_precision(cfg)  # names SOLVER.AMP.PRECISION if it is wrong
    weights = cfg.MODEL.WEIGHTS
    resuming = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if weights and "://" not in weights and not os.path.isfile(weights) and not resuming:
        raise ValueError(
            f"cfg.MODEL.WEIGHTS = {weights!r}: no such file. Pretrain with configs/imagenet/*.yaml and convert "
            "with tools/convert_pretrained.py (see configs/randwire_frcnn.yaml), or pass MODEL.WEIGHTS \"\" "
            "to train from scratch."
        )
    if weights and "://" not in weights and os.path.isfile(weights) and not resuming:
        from ..checkpoint import weights_file_problem

        problem = weights_file_problem(weights)
        if problem:
            raise ValueError(
                f"cfg.MODEL.WEIGHTS = {weights!r} {problem}, not a checkpoint (a PyTorch .pth or a detectron2 "
                ".pkl, e.g. model_final.pth of a training or tools/convert_pretrained.py's output)."
            )
    rw = cfg.MODEL.RANDWIRE
    if world > 1 and not device.startswith("cuda"):
        norms = {
            "MODEL.RANDWIRE.NORM": rw.NORM,
            "MODEL.FPN.NORM": cfg.MODEL.FPN.NORM,
            "MODEL.RESNETS.NORM": cfg.MODEL.RESNETS.NORM,
            "MODEL.ROI_BOX_HEAD.NORM": cfg.MODEL.ROI_BOX_HEAD.NORM,
        }
        for key, norm in norms.items():
            if norm == "SyncBN":
                raise ValueError(
                    f"cfg.{key} = 'SyncBN' needs CUDA (torch's SyncBatchNorm runs on GPUs only) but this "
                    f"{world}-process run is on {device!r}: use 'naiveSyncBN' (detectron2's all-reduce "
                    "BN, works with gloo on CPU), 'GN' or 'BN'."
                )
    if not weights and rw.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.NAME.startswith("build_randwire"):
        raise ValueError(
            "cfg.MODEL.RANDWIRE.NORM = 'FrozenBN' with no MODEL.WEIGHTS freezes randomly initialised "
            "statistics: to train from scratch use NORM BN, SyncBN or GN and MODEL.BACKBONE.FREEZE_AT 0."
        )


def amp_needs_cuda(cfg) -> bool:
    # detectron2's AMPTrainer requires CUDA
    return bool(cfg.SOLVER.AMP.ENABLED) and not (torch.cuda.is_available() and str(cfg.MODEL.DEVICE).startswith("cuda"))
