"""The model zoo: config files by name, configs, and built models.

Where the configs are: ``randwire_d2/model_zoo/configs/`` in an installed package (setup.py
copies the top-level ``configs/`` there when it builds), or the top-level ``configs/`` of a
source checkout (editable installs, ``PYTHONPATH=checkout``).
"""
import os
from typing import Dict, List, Optional

import torch

from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model

from ..checkpoint import RandWireCheckpointer
from ..config import add_classification_config, add_randwire_config

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SUFFIXES = (".yaml", ".py")

# config name -> URL of its published trained weights. None are published yet: every
# number in MODEL_ZOO.md comes with the command that trains the model yourself.
TRAINED_WEIGHTS: Dict[str, str] = {}


def configs_root() -> str:
    """The folder the config names are relative to."""
    packaged = os.path.join(_PACKAGE_DIR, "model_zoo", "configs")
    if os.path.isdir(packaged):
        return packaged
    checkout = os.path.dirname(_PACKAGE_DIR)
    source = os.path.join(checkout, "configs")
    if os.path.isdir(source) and os.path.isfile(os.path.join(checkout, "setup.py")):
        return source
    raise FileNotFoundError(
        f"randwire_d2's configs are missing: neither {packaged} (an installed package) nor the configs/ of a "
        "source checkout exists. Reinstall randwire_d2 from its repository (pip install .)."
    )


def list_configs() -> List[str]:
    """Every config name (relative path below configs/), sorted."""
    root = configs_root()
    names = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(_SUFFIXES) and f != "__init__.py":
                names.append(os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/"))
    return sorted(names)


def get_config_file(config_path: str) -> str:
    """Absolute path of a config by name, e.g. ``"randwire_frcnn.yaml"``,
    ``"demo/randwire_frcnn_demo.yaml"``, ``"lazy/randwire_frcnn.py"``."""
    root = configs_root()
    path = os.path.normpath(os.path.join(root, config_path))
    if not config_path.endswith(_SUFFIXES) or not path.startswith(root + os.sep) or not os.path.isfile(path):
        raise FileNotFoundError(
            f"Config {config_path!r} is not in the randwire_d2 model zoo ({root}); available: "
            f"{', '.join(list_configs())}."
        )
    return path


def get_checkpoint_url(config_path: str) -> str:
    """URL of the published trained weights of a config; a clear error while there are none."""
    get_config_file(config_path)  # an unknown name is its own error
    url = TRAINED_WEIGHTS.get(config_path)
    if url is None:
        published = ", ".join(sorted(TRAINED_WEIGHTS)) or "none yet"
        raise RuntimeError(
            f"No published trained weights for {config_path!r} (configs with published weights: {published}). "
            f"Train it with `python tools/train_net.py --config-file configs/{config_path}` (lazy configs: "
            "tools/lazyconfig_train_net.py), then load OUTPUT_DIR/model_final.pth: "
            "model_zoo.get(name, weights=path) (see MODEL_ZOO.md)."
        )
    return url


def get_config(config_path: str, trained: bool = False):
    """A config by name: a yaml's ``CfgNode`` (detectron2 defaults + MODEL.RANDWIRE and the
    classification keys), or a LazyConfig ``.py``'s config. ``trained``: set the weights to
    the published trained model's (an error naming the config while there are none)."""
    path = get_config_file(config_path)
    url = get_checkpoint_url(config_path) if trained else None
    if path.endswith(".yaml"):
        cfg = get_cfg()
        add_randwire_config(cfg)
        add_classification_config(cfg)
        cfg.merge_from_file(path)
        if url:
            cfg.MODEL.WEIGHTS = url
        return cfg
    cfg = LazyConfig.load(path)
    if url:
        cfg.train.init_checkpoint = url
    return cfg


def _weights_of(cfg) -> str:
    if isinstance(cfg, CfgNode):
        return cfg.MODEL.WEIGHTS
    return cfg.train.init_checkpoint if "train" in cfg and "init_checkpoint" in cfg.train else ""


def get(config_path: str, trained: bool = False, device: Optional[str] = None, *, weights: Optional[str] = None):
    """The model of a config, built and loaded, as detectron2's ``model_zoo.get`` returns it
    (in training mode: call ``.eval()`` for inference).

    Weights: ``trained=True`` the published ones; otherwise ``weights`` (a checkpoint path,
    ``""`` for random initialisation) or, when None, the config's MODEL.WEIGHTS /
    ``train.init_checkpoint`` (e.g. an ImageNet-pretrained backbone), which must exist.
    ``device``: default the config's for yaml, CPU when CUDA is absent."""
    cfg = get_config(config_path, trained=trained)
    path = _weights_of(cfg) if weights is None or trained else weights
    if path and "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(
            f"{config_path}: weights {path!r} do not exist (relative to {os.getcwd()}). Create them with the "
            f"command in configs/{config_path}, pass weights=<checkpoint>, or weights=\"\" for a randomly "
            "initialised model."
        )
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if isinstance(cfg, CfgNode):
        if device is not None:
            cfg.MODEL.DEVICE = device
        model = build_model(cfg)
        partial = cfg.MODEL.RANDWIRE.PARTIAL_WEIGHTS
    else:
        model = instantiate(cfg.model)
        if device is not None:
            model = model.to(device)
        partial = False
    if path:
        RandWireCheckpointer(model, partial_weights=partial).load(path)
    return model
