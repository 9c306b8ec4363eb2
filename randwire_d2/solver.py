"""Optimizer and epoch-based schedule for RandWire models (classification and detection).

* :func:`build_optimizer`: SGD (``SOLVER.MOMENTUM``, ``SOLVER.NESTEROV``) with
  ``SOLVER.WEIGHT_DECAY`` on convolution / linear weights only. No weight decay on
  normalisation parameters (BN, SyncBN, GN, LN, ...: ``SOLVER.WEIGHT_DECAY_NORM``,
  0 by default), on any bias, nor on the nodes' aggregation weights
  (``*agg_weight``). Gradient clipping follows ``SOLVER.CLIP_GRADIENTS`` through
  detectron2's ``maybe_add_gradient_clipping``.
* The LR schedule is detectron2's own ``WarmupCosineLR`` (linear warm-up, then a
  half-period cosine from BASE_LR to 0 over MAX_ITER), built by ``DefaultTrainer``.
* :func:`resolve_schedule`: turns the epoch keys of ``add_classification_config`` into
  iterations and scales the LR linearly with the batch size.
"""
import logging
import math
from typing import Dict, List

import torch
from torch import nn

from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["NO_DECAY_SUFFIXES", "NORM_TYPES", "build_optimizer", "optimizer_param_groups", "param_groups", "resolve_schedule"]

logger = logging.getLogger(__name__)

NO_DECAY_SUFFIXES = ("agg_weight",)


def _norm_types():
    types = [
        nn.modules.batchnorm._BatchNorm,  # BN, SyncBN, detectron2's NaiveSyncBatchNorm
        nn.GroupNorm,
        nn.LayerNorm,
        nn.LocalResponseNorm,
        nn.modules.instancenorm._InstanceNorm,
    ]
    try:  # detectron2's LayerNorm (HEAD only) and FrozenBN (buffers only, listed for clarity)
        from detectron2.layers import FrozenBatchNorm2d

        types.append(FrozenBatchNorm2d)
        from detectron2.layers import LayerNorm as D2LayerNorm  # type: ignore

        types.append(D2LayerNorm)
    except ImportError:
        pass
    return tuple(types)


NORM_TYPES = _norm_types()


def param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, weight_decay_norm: float = 0.0, bias_lr_factor: float = 1.0
) -> List[Dict]:
    """Parameter groups: ``weight_decay`` for weights of convs/linears and the like;
    ``weight_decay_norm`` for norm layers; 0 for biases and ``*agg_weight``.

    Each group carries a "names" list (ignored by the optimizer) for inspection.
    Frozen parameters (requires_grad=False) are left out.
    """
    groups: Dict[tuple, Dict] = {}
    seen = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES)
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}" if module_name else pname
            lr = base_lr
            if is_norm:
                wd = weight_decay_norm
            elif pname == "bias":
                wd, lr = 0.0, base_lr * bias_lr_factor
            elif full.endswith(NO_DECAY_SUFFIXES):
                wd = 0.0
            else:
                wd = weight_decay
            group = groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd, "names": []})
            group["params"].append(p)
            group["names"].append(full)
    return list(groups.values())


def optimizer_param_groups(
    model: nn.Module, *, base_lr: float, weight_decay: float, weight_decay_norm: float = 0.0, bias_lr_factor: float = 1.0
) -> List[Dict]:
    """:func:`param_groups` ready for a torch optimizer (no "names"); refuses an all-frozen
    model. The LazyConfig optimizers' ``params`` (``model`` set by the training script)."""
    groups = param_groups(model, base_lr, weight_decay, weight_decay_norm, bias_lr_factor)
    if not groups:
        raise ValueError("The model has no trainable parameters (everything frozen?).")
    for g in groups:
        g.pop("names")
    return groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD + momentum with weight decay only where it belongs (see module docstring)."""
    groups = optimizer_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
    )
    name = cfg.SOLVER.get("OPTIMIZER", "SGD")
    if name == "SGD":
        optim, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    elif name == "AdamW":
        optim, kwargs = torch.optim.AdamW, {"betas": tuple(cfg.SOLVER.BETAS)}
    else:
        raise ValueError(f"cfg.SOLVER.OPTIMIZER = {name!r} is invalid: allowed are 'SGD' and 'AdamW'.")
    return maybe_add_gradient_clipping(cfg, optim)(
        groups, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs
    )


# hyper-parameters that only one optimizer family has in its param groups
_FAMILY_KEYS = {"SGD": ("momentum", "nesterov", "dampening"), "AdamW": ("betas", "eps", "amsgrad")}


def _family(group_keys) -> str:
    for name, keys in _FAMILY_KEYS.items():
        if keys[0] in group_keys:
            return name
    return "unknown"


def describe_optimizer_mismatch(optimizer: torch.optim.Optimizer, saved, cfg=None) -> str:
    """Why the optimizer state ``saved`` (a state_dict) cannot be loaded into
    ``optimizer``, or '' if it can. torch would load mismatched groups and fail later
    (``KeyError: 'momentum'`` at the first step) or say only that sizes differ."""
    if not isinstance(saved, dict) or "param_groups" not in saved:
        return ""
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if not saved_groups or not groups:
        return ""
    ours, theirs = _family(groups[0]), _family(saved_groups[0])
    if ours != theirs:
        name = cfg.SOLVER.get("OPTIMIZER", "SGD") if cfg is not None else ours
        return (
            f"its optimizer state is {theirs} (param-group settings {', '.join(_FAMILY_KEYS.get(theirs, ()))}) "
            f"but this run's SOLVER.OPTIMIZER is {name!r} ({', '.join(_FAMILY_KEYS.get(ours, ()))}): "
            "SOLVER.OPTIMIZER differs from the run that wrote the checkpoint"
        )
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in saved_groups]
    if sizes != saved_sizes:
        return (
            f"its optimizer has {len(saved_sizes)} parameter group(s) of {saved_sizes} tensors, this run's "
            f"{len(sizes)} of {sizes}: the trainable parameters or their weight-decay/LR grouping differ "
            "(MODEL.BACKBONE.FREEZE_AT, SOLVER.WEIGHT_DECAY, WEIGHT_DECAY_NORM, BIAS_LR_FACTOR)"
        )
    return ""


def num_train_images(cfg) -> int:
    from detectron2.data import DatasetCatalog

    from .data.classification import set_imagenet_root

    set_imagenet_root(cfg.DATASETS.get("IMAGENET_ROOT", ""))
    total = 0
    for name in cfg.DATASETS.TRAIN:
        n = len(DatasetCatalog.get(name))
        if n == 0:
            raise ValueError(f"Training dataset {name!r} is empty.")
        total += n
    return total


def resolve_schedule(cfg, num_images: int = None):
    """Turn epoch-based settings into iterations (mutates a defrosted ``cfg``; returns it).

    * ``SOLVER.LR_PER_256 > 0``: ``BASE_LR = LR_PER_256 * IMS_PER_BATCH / 256`` (linear
      scaling rule; the paper's 0.1 per 256 images).
    * ``SOLVER.EPOCHS > 0``: ``MAX_ITER = ceil(EPOCHS * N / IMS_PER_BATCH)`` with N the
      number of images in ``DATASETS.TRAIN`` (listed through DatasetCatalog unless
      ``num_images`` is given); then, when positive, ``WARMUP_EPOCHS``,
      ``SOLVER.CHECKPOINT_EPOCHS`` and ``TEST.EVAL_EPOCHS`` set WARMUP_ITERS,
      CHECKPOINT_PERIOD and TEST.EVAL_PERIOD.
    With the defaults (all 0) nothing changes: detection configs are untouched.
    Leave ``SOLVER.REFERENCE_WORLD_SIZE`` at 0: IMS_PER_BATCH is the total batch.
    """
    solver = cfg.SOLVER
    epochs = float(solver.get("EPOCHS", 0.0))
    lr_per_256 = float(solver.get("LR_PER_256", 0.0))
    if epochs < 0 or lr_per_256 < 0:
        raise ValueError(f"SOLVER.EPOCHS ({epochs}) and SOLVER.LR_PER_256 ({lr_per_256}) must be >= 0.")
    batch = solver.IMS_PER_BATCH
    if lr_per_256 > 0:
        solver.BASE_LR = lr_per_256 * batch / 256.0
        logger.info(f"BASE_LR = {lr_per_256} x {batch} / 256 = {solver.BASE_LR:g}")
    if epochs > 0:
        if num_images is None:
            num_images = num_train_images(cfg)
        iters_per_epoch = num_images / batch
        solver.MAX_ITER = int(math.ceil(epochs * iters_per_epoch))
        warmup_epochs = float(solver.get("WARMUP_EPOCHS", 0.0))
        if warmup_epochs > 0:
            solver.WARMUP_ITERS = min(solver.MAX_ITER, int(round(warmup_epochs * iters_per_epoch)))
        if float(solver.get("CHECKPOINT_EPOCHS", 0.0)) > 0:
            solver.CHECKPOINT_PERIOD = max(1, int(round(solver.CHECKPOINT_EPOCHS * iters_per_epoch)))
        if float(cfg.TEST.get("EVAL_EPOCHS", 0.0)) > 0:
            cfg.TEST.EVAL_PERIOD = max(1, int(round(cfg.TEST.EVAL_EPOCHS * iters_per_epoch)))
        logger.info(
            f"{epochs:g} epochs of {num_images} images at batch {batch}: MAX_ITER={solver.MAX_ITER}, "
            f"WARMUP_ITERS={solver.WARMUP_ITERS}, CHECKPOINT_PERIOD={solver.CHECKPOINT_PERIOD}, "
            f"TEST.EVAL_PERIOD={cfg.TEST.EVAL_PERIOD}"
        )
    return cfg
