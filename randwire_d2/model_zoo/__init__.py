"""Configs by name and models built from them, as ``detectron2.model_zoo``:

    from randwire_d2 import model_zoo
    cfg = model_zoo.get_config("randwire_frcnn.yaml")             # CfgNode with MODEL.RANDWIRE
    lazy = model_zoo.get_config("lazy/randwire_frcnn.py")         # LazyConfig
    model = model_zoo.get("demo/randwire_frcnn_demo.yaml")        # built detector

Names are paths below the repository's ``configs/`` (``model_zoo.list_configs()``); an
installed package carries them as package data.
"""
from .model_zoo import get, get_checkpoint_url, get_config, get_config_file, list_configs

__all__ = ["get", "get_checkpoint_url", "get_config", "get_config_file", "list_configs"]
