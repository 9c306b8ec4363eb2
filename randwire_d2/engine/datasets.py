"""Detection training data for the trainers: detectron2's dataset dicts (same filtering
as its loader) passed through our checks, and a hint for detectron2's builtin-dataset root
when one of its files is missing."""
import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.validation import DataError, sanitize_detection_dicts

__all__ = ["builtin_dataset_hint", "detection_train_dicts", "load_detection_train_dicts"]


def _detection_num_classes(cfg) -> Optional[int]:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "ProposalNetwork":
        return None
    if arch == "RetinaNet":
        return int(cfg.MODEL.RETINANET.NUM_CLASSES)
    return int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)


def builtin_dataset_hint(exc: BaseException) -> str:
    """For a file missing under detectron2's builtin-dataset root: where that root comes from."""
    missing = getattr(exc, "filename", None)
    env = os.environ.get("DETECTRON2_DATASETS")
    root = os.path.abspath(os.path.expanduser(env or "datasets"))
    if not missing or not os.path.abspath(str(missing)).startswith(root + os.sep):
        return ""
    now = f"DETECTRON2_DATASETS={env!r}" if env else "DETECTRON2_DATASETS is unset, so ./datasets"
    return (
        f" detectron2 reads its builtin datasets (coco_2017_*, lvis_*, voc_*, ...) from $DETECTRON2_DATASETS "
        f"({now}) in its layout (coco/annotations/instances_val2017.json, coco/val2017/, ...): "
        "export DETECTRON2_DATASETS=/path/to/datasets before starting."
    )


def load_detection_train_dicts(cfg) -> List[Dict]:
    """detectron2's training dicts (same filtering as its loader), then our checks."""
    return detection_train_dicts(
        cfg.DATASETS.TRAIN,
        num_classes=_detection_num_classes(cfg),
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


def detection_train_dicts(
    names, *, num_classes: Optional[int], filter_empty: bool = True, min_keypoints: int = 0, proposal_files=None
) -> List[Dict]:
    """:func:`load_detection_train_dicts` with explicit arguments (LazyConfig data configs)."""
    from detectron2.data import get_detection_dataset_dicts

    names = [names] if isinstance(names, str) else list(names)
    try:
        dicts = get_detection_dataset_dicts(
            names, filter_empty=filter_empty, min_keypoints=min_keypoints, proposal_files=proposal_files
        )
    except DataError:
        raise
    except Exception as exc:  # e.g. load_coco_json's KeyError on an unknown category id
        files = [MetadataCatalog.get(n).get("json_file", None) for n in names if n in DatasetCatalog.list()]
        files = [f for f in files if f]
        raise DataError(
            f"Cannot load training dataset(s) {names}"
            + (f" (annotation file(s) {files})" if files else "")
            + f": {type(exc).__name__}: {exc}"
            + builtin_dataset_hint(exc)
        ) from exc
    dicts, _ = sanitize_detection_dicts(
        dicts,
        num_classes if num_classes is not None else 2**31,
        filter_empty=filter_empty,
        dataset_names=names,
    )
    if not dicts:
        raise DataError(f"No usable training images left in {names}.")
    return dicts
