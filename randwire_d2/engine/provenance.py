"""Which weights a result is of, and results that never replace a training's.

* ``final_metrics.json`` records the evaluated weights under ``"weights"``: path and
  sha256 of the file (an --eval-only run's MODEL.WEIGHTS, a training's model_final.pth),
  or, for a periodic evaluation during training, the iteration of the in-memory weights.
* ``--eval-only`` into an OUTPUT_DIR that holds a training evaluates into
  ``OUTPUT_DIR/eval_<weights>_<sha256[:8]>/`` (config.yaml, log, metrics of its own).
* Checkpoints record the class names of the training data; evaluation refuses a dataset
  with other classes (same count, other meaning, would score nonsense).
"""
import hashlib
import os
from typing import Dict, List, Optional

from detectron2.data import MetadataCatalog

from ..config import is_classification
from ..data.custom import dataset_class_names
from .results import RESULTS_FILE, WEIGHTS_KEY

__all__ = [
    "WEIGHTS_KEY",
    "check_checkpoint_classes",
    "describe_weights",
    "evaluated_weights",
    "file_sha256",
    "setup_eval_only",
    "train_class_names",
    "training_weights",
]


_EVAL_WEIGHTS: Dict = {}  # {"record": describe_weights(...)} in an --eval-only process (setup)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_weights(path: str) -> Dict:
    """{"path", "sha256"} of a weights file (no checksum for a URL)."""
    if not path or "://" in path or not os.path.isfile(path):
        return {"path": path or None, "sha256": None}
    return {"path": os.path.abspath(path), "sha256": file_sha256(path)}


def evaluated_weights(cfg) -> Dict:
    """The weights an evaluation in this process scores: those of an --eval-only run (its
    MODEL.WEIGHTS, resolved by :func:`setup_eval_only`), else the training's: model_final.pth once
    written, the in-memory weights of the current iteration before."""
    if _EVAL_WEIGHTS.get("record") is not None:
        return _EVAL_WEIGHTS["record"]
    return training_weights(cfg.OUTPUT_DIR)


def training_weights(output_dir: str) -> Dict:
    """The weights a training's evaluation scores: model_final.pth once written (the final
    evaluation), else the in-memory weights of the current iteration."""
    final = os.path.join(output_dir, "model_final.pth")
    last = os.path.join(output_dir, "last_checkpoint")
    try:
        with open(last) as f:
            is_final = f.read().strip() == "model_final.pth"
    except OSError:
        is_final = False
    if is_final and os.path.isfile(final):
        return describe_weights(final)
    from detectron2.utils.events import get_event_storage

    try:
        iteration = get_event_storage().iter
    except AssertionError:
        iteration = None
    return {"path": None, "sha256": None, "iteration": iteration, "note": "weights in memory during training"}


TRAINING_FILES = ("last_checkpoint", "model_final.pth", "metrics.json", RESULTS_FILE)


def eval_weights_path(cfg, resume: bool) -> str:
    """The weights --eval-only scores: with --resume, OUTPUT_DIR's last checkpoint (if any)."""
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if resume and os.path.isfile(last):
        with open(last) as f:
            name = f.read().strip()
        return os.path.join(cfg.OUTPUT_DIR, name)
    return cfg.MODEL.WEIGHTS


def setup_eval_only(cfg, resume: bool, eval_only: bool = True) -> List[str]:
    """--eval-only: resolve the weights into MODEL.WEIGHTS, and when OUTPUT_DIR holds a
    training, evaluate into OUTPUT_DIR/eval_<weights>_<sha256[:8]>/: its config.yaml,
    log and final_metrics.json stay the training's. Returns messages for the log.
    ``eval_only`` False (a training): forgets an earlier evaluation's weights (tests run
    several in one process)."""
    _EVAL_WEIGHTS.clear()
    if not eval_only:
        return []
    weights = eval_weights_path(cfg, resume)
    if not weights:
        raise ValueError(
            "--eval-only with an empty cfg.MODEL.WEIGHTS would evaluate a randomly initialised model: pass "
            "MODEL.WEIGHTS <checkpoint>, or --resume to evaluate OUTPUT_DIR's last checkpoint."
        )
    record = describe_weights(weights)
    _EVAL_WEIGHTS["record"] = record
    cfg.MODEL.WEIGHTS = weights
    out = cfg.OUTPUT_DIR
    if any(os.path.exists(os.path.join(out, f)) for f in TRAINING_FILES):
        stem = os.path.splitext(os.path.basename(weights.rstrip("/")))[0] or "weights"
        cfg.OUTPUT_DIR = os.path.join(out, f"eval_{stem}" + (f"_{record['sha256'][:8]}" if record["sha256"] else ""))
        return [f"OUTPUT_DIR {out!r} holds a training: the evaluation of {weights!r} goes to {cfg.OUTPUT_DIR!r}."]
    return []


def dataset_classes(cfg, name: str) -> Optional[List[str]]:
    """A dataset's class names (detection: thing_classes, classification: classes), or None."""
    meta = MetadataCatalog.get(name)
    classes = meta.get("classes", None) if is_classification(cfg) else None
    if classes is None:
        try:
            classes = dataset_class_names(name)
        except ValueError:
            classes = None
    return list(classes) if classes is not None else None


def train_class_names(cfg) -> Optional[List[str]]:
    """The class names the training data defines (recorded in checkpoints)."""
    return dataset_classes(cfg, cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None


def check_checkpoint_classes(cfg, checkpoint_classes, source: str) -> None:
    """Refuse to evaluate weights on a dataset with other classes than they were trained on."""
    if not checkpoint_classes:
        return
    for name in cfg.DATASETS.TEST:
        classes = dataset_classes(cfg, name)
        if classes is not None and classes != list(checkpoint_classes):
            raise ValueError(
                f"Checkpoint {source} was trained on the classes {list(checkpoint_classes)[:12]}, but dataset "
                f"{name!r} (cfg.DATASETS.TEST) has {classes[:12]}: class ids would mean other classes. Evaluate "
                "weights trained on this dataset's classes."
            )
