"""Checkpoints that carry their graph specs, are written atomically, and refuse a
model wired differently from the one they were trained with, or of other shapes
(another width or preset), unless partial loading is asked for; on resume, an
unreadable latest checkpoint falls back to the previous good one."""
import glob
import logging
import os
import pickle
import re
from typing import Dict, List, Mapping

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


_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"), (b"BZh", "a bzip2 archive"), (b"\xfd7zXZ", "an xz archive"),
    (b"7z\xbc\xaf", "a 7z archive"), (b"%PDF", "a PDF document"), (b"\x89HDF", "an HDF5 file"),
    (b"\x93NUMPY", "a numpy .npy array"), (b"\x7fELF", "an executable"),
)


def weights_file_problem(path: str) -> str:
    """'' if ``path`` can be a checkpoint (a PyTorch zip or pickle, a detectron2 .pkl),
    else what it is instead; reads only its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip (torch >= 1.6), pickle protocol >= 2
        return ""
    if not head:
        return "is an empty file"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return f"is {what}"
    try:
        text = head.decode("utf-8").lstrip()
    except UnicodeDecodeError:
        return "is an unknown binary file"
    if text.startswith(("{", "[")):
        return "is a text (JSON?) file"
    if text.startswith(("_BASE_", "MODEL", "#", "---")):
        return "is a text (YAML config?) file"
    return "is a text file"


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, missing)."""


def _shape(value):
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else None


# layers whose shape follows the number of classes (detector box predictor, RetinaNet and
# classifier heads): another class count is fine-tuning, not a wrong checkpoint
CLASS_SPECIFIC = tuple(
    f"{layer}.{p}" for layer in ("box_predictor.cls_score", "box_predictor.bbox_pred", "head.cls_score",
                                 "head.bbox_pred", "head.fc") for p in ("weight", "bias")
)


CLASS_NAMES_KEY = "class_names"


def _class_count(key: str, shape) -> str:
    """The class count a class-specific tensor implies ('' where it cannot tell)."""
    if key.endswith("box_predictor.cls_score.weight") or key.endswith("box_predictor.cls_score.bias"):
        return str(shape[0] - 1)  # + background
    if key.endswith("head.fc.weight") or key.endswith("head.fc.bias"):
        return str(shape[0])
    return ""


def check_tensor_shapes(model_state: Mapping, ckpt_state: Mapping, source: str, by_suffix: bool = False,
                        other_classes_ok: bool = True, class_names=None) -> None:
    """Refuse a checkpoint whose tensors do not fit the model: the first tensor of another
    shape is named with both shapes; a checkpoint of which no tensor fits any parameter
    is refused too. (detectron2 would skip them with a warning and train from scratch.)
    Class-specific layers (``CLASS_SPECIFIC``) of another class count are left out with a warning.
    ``by_suffix``: names match by suffix, as detectron2's matching heuristics do."""
    shapes = {k: tuple(v.shape) for k, v in model_state.items()}
    suffixes: Dict[str, List[str]] = {}
    if by_suffix:
        for k in shapes:
            parts = k.split(".")
            for i in range(len(parts)):
                suffixes.setdefault(".".join(parts[i:]), []).append(k)
    fitting, class_specific = 0, []
    for key, value in ckpt_state.items():
        shape = _shape(value)
        name = key[len("module."):] if key.startswith("module.") else key
        targets = [name] if name in shapes else suffixes.get(name, [])
        if shape is None or len(targets) != 1:
            continue
        if shapes[targets[0]] != shape and name.endswith(CLASS_SPECIFIC):
            if not other_classes_ok:
                theirs, ours = _class_count(name, shape), _class_count(name, shapes[targets[0]])
                named = f" {list(class_names)}" if class_names else ""
                counts = (f"was trained for {theirs} classes{named}, the model predicts {ours}" if theirs and ours
                          else f"was trained for another number of classes ({key} {list(shape)}, the model's "
                          f"{list(shapes[targets[0]])})")
                raise ValueError(
                    f"Checkpoint {source} {counts} (MODEL.ROI_HEADS.NUM_CLASSES / RETINANET.NUM_CLASSES / "
                    "RANDWIRE.NUM_CLASSES): evaluation and inference need every tensor of the checkpoint; set "
                    "the class count it was trained for, or evaluate weights trained on these classes."
                )
            class_specific.append(f"{key} {list(shape)} -> {list(shapes[targets[0]])}")
            continue
        if shapes[targets[0]] != shape:
            raise ValueError(
                f"Checkpoint {source} does not fit the model: its tensor {key!r} has shape {list(shape)}, the "
                f"model's {targets[0]!r} {list(shapes[targets[0]])} (first mismatch: another width or preset, "
                "e.g. MODEL.RANDWIRE.CHANNELS/REGIME/NUM_CLASSES?). Set MODEL.RANDWIRE.PARTIAL_WEIGHTS True to "
                "load only the tensors that fit."
            )
        fitting += 1
    if class_specific:  # fine-tuning to another class count: detectron2 re-initialises these
        logging.getLogger("randwire_d2").warning(
            "Checkpoint %s was trained for another number of classes: its class-specific layers are not "
            "loaded (%s); everything else fits.", source, "; ".join(class_specific),
        )
    if ckpt_state and not fitting:
        example = next(iter(ckpt_state))
        raise ValueError(
            f"Checkpoint {source} does not fit the model: none of its {len(ckpt_state)} tensors (e.g. {example!r}) "
            "matches a parameter of the model. Set MODEL.RANDWIRE.PARTIAL_WEIGHTS True to load it anyway."
        )


_ITER_RE = re.compile(r"model_(\d+)\.pth$")


def _checkpoint_rank(path: str) -> float:
    match = _ITER_RE.search(os.path.basename(path))
    if match:
        return int(match.group(1))
    return float("inf") if os.path.basename(path) == "model_final.pth" else -1


class RandWireCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that saves graph specs, writes atomically, verifies specs
    and tensor shapes on load, accepts classification checkpoints for detection models,
    and resumes from the previous good checkpoint when the latest one is unreadable.

    ``partial_weights`` (cfg.MODEL.RANDWIRE.PARTIAL_WEIGHTS): load only the tensors that fit.
    ``complete`` (evaluation, inference): every tensor of the model must come from the
    checkpoint (no re-initialised class-specific layers, no missing ones).
    ``class_names``: saved in every checkpoint; ``loaded_class_names`` are the loaded one's."""

    def __init__(self, model, save_dir: str = "", *, partial_weights: bool = False, complete: bool = False,
                 class_names=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.partial_weights = bool(partial_weights)
        self.complete = bool(complete)
        self.class_names = list(class_names) if class_names else None
        self.loaded_class_names = None

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data.setdefault(GRAPHS_KEY, specs_to_dict(graph_specs_of(self.model)))
        if self.class_names:
            data.setdefault(CLASS_NAMES_KEY, self.class_names)
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
            raise CheckpointReadError(f"Cannot load checkpoint {filename!r}: {type(exc).__name__}: {exc}") from exc

    def resume_or_load(self, path: str, *, resume: bool = True):
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        latest = self.get_checkpoint_file()
        try:
            if not os.path.isfile(latest):
                raise CheckpointReadError(f"Cannot load checkpoint {latest!r}: the file does not exist")
            return self.load(latest)
        except CheckpointReadError as exc:
            problem = exc
        for candidate in self._older_checkpoints(latest):
            try:
                loaded = self.load(candidate)
            except CheckpointReadError:
                continue
            self.logger.warning(f"{problem}; resumed from the previous good checkpoint {candidate!r} instead.")
            return loaded
        raise problem

    def _older_checkpoints(self, latest: str) -> List[str]:
        rank = _checkpoint_rank(latest)
        others = [p for p in glob.glob(os.path.join(glob.escape(self.save_dir), "model_*.pth")) if p != latest]
        return sorted((p for p in others if _checkpoint_rank(p) < rank), key=_checkpoint_rank, reverse=True)

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
        self.loaded_class_names = checkpoint.get(CLASS_NAMES_KEY)
        if not self.partial_weights or self.complete:
            check_tensor_shapes(
                self.model.state_dict(), checkpoint["model"], source,
                by_suffix=bool(checkpoint.get("matching_heuristics", False)),
                other_classes_ok=not self.complete, class_names=self.loaded_class_names,
            )
        incompatible = super()._load_model(checkpoint)
        if self.complete and incompatible is not None and incompatible.missing_keys:
            missing = incompatible.missing_keys
            raise ValueError(
                f"Checkpoint {source} has no tensor for {len(missing)} of the model's parameters/buffers (e.g. "
                f"{missing[0]!r}): evaluation and inference would use randomly initialised layers. Use weights "
                "of a trained model of this architecture (e.g. model_final.pth of its training)."
            )
        return incompatible

    def load(self, path: str, checkpointables=None):
        self._current_file = path
        try:
            return super().load(path, checkpointables=checkpointables)
        finally:
            # HEAD asserts this is None on entry and resets it only on success: after one
            # refused checkpoint, the next load must still work
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None
