"""LazyConfig (python) configs for ``tools/lazyconfig_train_net.py``: loading with
checked ``key=value`` overrides (a typo is refused, not silently added) and the yaml
path's run-setting checks on ``train.*``."""
import inspect
import logging
import os

import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig
from detectron2.utils.registry import locate

from ..modeling import RandWireNet
from .precision import precision_for

__all__ = ["check_override_keys", "check_train_settings", "load_config"]

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
    """The yaml path's checks (randwire_d2.engine.run_settings.check_run_settings) on train.*."""
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
    """train.amp.precision resolved for train.device (randwire_d2/engine/precision.py)."""
    return precision_for(cfg.train.amp.get("precision", "auto"), cfg.train.device, cfg.train.amp.enabled,
                         "train.amp.precision")
