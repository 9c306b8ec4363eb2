"""Checkpoints that carry their graph specs, are written atomically, and refuse a
model wired differently from the one they were trained with."""
import glob
import logging
import os
import pickle
from typing import Dict, Mapping

import numpy as np
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer

from .graphs import GraphSpec, describe_differences, specs_from_dict, specs_to_dict
from .modeling.network import RandWireNet

GRAPHS_KEY = "randwire_graphs"
HEAD_PREFIX = "backbone.head."

logger = logging.getLogger(__name__)


def find_randwire(model: nn.Module) -> RandWireNet:
    """The RandWireNet inside ``model`` (a detector, a classifier, or DDP-wrapped), or None."""
    return next((m for m in model.modules() if isinstance(m, RandWireNet)), None)


def graph_specs_of(model: nn.Module) -> Dict[str, GraphSpec]:
    net = find_randwire(model)
    return net.graph_specs if net is not None else {}


def read_graph_specs(path: str) -> Dict[str, GraphSpec]:
    """Graph specs stored in a .pth checkpoint or converted .pkl."""
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt or foreign file: say which
        raise ValueError(f"Cannot read checkpoint {path!r}: {exc}") from exc
    if not isinstance(data, Mapping) or GRAPHS_KEY not in data:
        raise ValueError(f"Checkpoint {path!r} carries no RandWire graph specs ('{GRAPHS_KEY}').")
    return specs_from_dict(data[GRAPHS_KEY])


def classification_to_backbone(state_dict: Mapping[str, object]) -> Dict[str, object]:
    """Classifier weights -> backbone weights: drop the head, strip 'backbone.'.

    The remaining names ('stem.*', 'res2.*', ...) match the detection backbone's by
    suffix, so detectron2's matching heuristics load them with no renaming.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):  # saved from a DDP wrapper
            key = key[len("module."):]
        if key.startswith(HEAD_PREFIX) or not key.startswith("backbone."):
            continue
        out[key[len("backbone."):]] = value
    return out


def to_detection_pkl(checkpoint: Mapping, path: str) -> int:
    """Write a detection-ready .pkl (numpy arrays, matching heuristics, graph specs)."""
    weights = classification_to_backbone(checkpoint["model"])
    if not weights:
        raise ValueError("The checkpoint holds no 'backbone.*' weights: is it a RandWire classifier checkpoint?")
    data = {
        "model": {k: v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in weights.items()},
        "__author__": "randwire_d2",
        "matching_heuristics": True,
    }
    if GRAPHS_KEY in checkpoint:
        data[GRAPHS_KEY] = checkpoint[GRAPHS_KEY]
    _atomic_write(path, lambda f: pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL))
    return len(weights)


def _atomic_write(path: str, write) -> None:
    """Write through a temp file + rename: a crash never leaves a truncated file.

    Temp files left by a process killed mid-write (SIGKILL skips the cleanup below) are
    removed by the next write of the same file."""
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):
        try:
            os.remove(stale)
        except OSError:
            pass
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_graph_specs(model_specs: Mapping[str, GraphSpec], stored: Mapping[str, Mapping], source: str):
    """Refuse weights trained on other graphs: same shapes, different network."""
    stored_specs = specs_from_dict(stored)
    common = set(model_specs) & set(stored_specs)
    problems = describe_differences(
        {k: model_specs[k] for k in common}, {k: stored_specs[k] for k in common}
    )
    if problems:
        raise ValueError(
            f"Checkpoint {source} was trained on different random graphs than this model:\n  "
            + "\n  ".join(problems)
            + f"\nRebuild the model from the checkpoint's own graphs with "
            f"MODEL.RANDWIRE.GRAPHS_FILE {source} (or the matching GENERATOR/SEED)."
        )


class RandWireCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that saves graph specs, writes atomically, verifies specs
    on load, and accepts classification checkpoints for detection models."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data.setdefault(GRAPHS_KEY, specs_to_dict(graph_specs_of(self.model)))
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except Exception as exc:  # a truncated/corrupt file: name it, not pickle's internals
            raise ValueError(f"Cannot load checkpoint {filename!r}: {type(exc).__name__}: {exc}") from exc

    def _load_model(self, checkpoint):
        source = getattr(self, "_current_file", "(checkpoint)")
        if GRAPHS_KEY in checkpoint:
            check_graph_specs(graph_specs_of(self.model), checkpoint[GRAPHS_KEY], source)
        model_keys = self.model.state_dict().keys()
        ckpt_keys = checkpoint["model"].keys()
        is_classifier_ckpt = any(k.startswith(HEAD_PREFIX) for k in ckpt_keys)
        if is_classifier_ckpt and not any(k.startswith(HEAD_PREFIX) for k in model_keys):
            self.logger.info("Loading a RandWire classification checkpoint into the backbone.")
            checkpoint["model"] = classification_to_backbone(checkpoint["model"])
            checkpoint["matching_heuristics"] = True
        return super()._load_model(checkpoint)

    def load(self, path: str, checkpointables=None):
        self._current_file = path
        try:
            return super().load(path, checkpointables=checkpointables)
        finally:
            # HEAD asserts this is None on entry and resets it only on success: after one
            # refused checkpoint, the next load must still work
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None
