"""Hostile-input checks for detection data.

* :class:`SafeDatasetMapper`: detectron2's ``DatasetMapper`` whose errors name the image
  file (a missing, truncated, corrupt or unreadable image otherwise surfaces as a bare
  ``OSError: image file is truncated`` deep inside a loader worker).
* :func:`sanitize_detection_dicts`: run once on the training dicts before training.
  Where detectron2 users expect filtering it filters, counts and logs; where silently
  training on the data would be wrong it raises an error naming the file:

  ======================================  ==========================================
  degenerate box (zero width or height)   dropped, counted (detectron2 drops it too,
                                          silently, in ``filter_empty_instances``)
  negative width/height (x1 < x0)         dropped, counted (detectron2's transforms
                                          would silently flip it into another box)
  box entirely outside its image          dropped, counted (detectron2 clips it to
                                          nothing and drops it silently)
  no usable box left in the dataset       ``DataError`` (it would train on background)
  non-finite or malformed box             dropped, counted
  image left without annotations          removed, counted (``FILTER_EMPTY_ANNOTATIONS``)
  category id outside [0, NUM_CLASSES)    ``DataError`` naming the file and the id
  image file missing                      ``DataError`` naming the file(s)
  ======================================  ==========================================
"""
import copy
import logging
import math
import os
from typing import Dict, List, Sequence, Tuple

from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode

__all__ = ["DataError", "SafeDatasetMapper", "describe_image", "sanitize_detection_dicts"]

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message names the file (and image id / annotation) at fault."""


def describe_image(dataset_dict: Dict) -> str:
    name = dataset_dict.get("file_name")
    image_id = dataset_dict.get("image_id")
    text = repr(name) if name is not None else "(no file_name)"
    return text + (f" (image_id={image_id})" if image_id is not None else "")


class SafeDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper, re-raising any failure as :class:`DataError` naming the file."""

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"Cannot load image {describe_image(dataset_dict)}: {type(exc).__name__}: {exc}"
            ) from exc


def _box_problem(ann: Dict, width=None, height=None) -> str:
    """'' if the annotation's box is usable, else why not (``width``/``height``: the image's)."""
    bbox = ann.get("bbox")
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return f"malformed bbox {bbox!r}"
    if len(values) != 4:
        return f"bbox {bbox!r} does not have 4 values"
    if not all(math.isfinite(v) for v in values):
        return f"non-finite bbox {bbox!r}"
    mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
    try:
        x0, y0, x1, y1 = BoxMode.convert(values, mode, BoxMode.XYXY_ABS)
    except Exception as exc:  # an unknown mode, rotated boxes, ...
        return f"bbox {bbox!r} in mode {mode!r} cannot be converted: {exc}"
    if x1 < x0 or y1 < y0:
        return f"negative width/height bbox {bbox!r}"
    if x1 - x0 <= 1e-5 or y1 - y0 <= 1e-5:  # detectron2's nonempty() threshold
        return f"degenerate (empty) bbox {bbox!r}"
    if width and height and (x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height):
        # detectron2 clips it to an empty box and drops it: the object is not trained on
        return f"bbox {bbox!r} entirely outside the {width}x{height} image"
    return ""


def sanitize_detection_dicts(
    dicts: List[Dict],
    num_classes: int,
    *,
    filter_empty: bool = True,
    check_files: bool = True,
    dataset_names: Sequence[str] = (),
) -> Tuple[List[Dict], Dict[str, int]]:
    """Check detection dataset dicts; return (kept dicts, counts). See the module docstring.

    Dicts whose annotations change are copied; the input list is not modified.
    """
    where = f" of dataset {', '.join(dataset_names)}" if dataset_names else ""
    counts = {"images": len(dicts), "boxes": 0, "dropped_boxes": 0, "images_with_dropped_boxes": 0,
              "removed_images": 0}
    missing = []
    examples = []
    out = []
    for record in dicts:
        file_name = record.get("file_name")
        if check_files and (not isinstance(file_name, str) or not os.path.isfile(file_name)):
            missing.append(describe_image(record))
            continue
        anns = record.get("annotations")
        if anns is None:  # an unlabeled image (detectron2 then trains it as background)
            out.append(record)
            continue
        kept = []
        for ann in anns:
            cat = ann.get("category_id")
            if isinstance(cat, bool) or not isinstance(cat, int) or not 0 <= cat < num_classes:
                raise DataError(
                    f"Image {describe_image(record)}{where}: annotation with category id {cat!r} outside "
                    f"[0, {num_classes}) (MODEL.ROI_HEADS.NUM_CLASSES / RETINANET.NUM_CLASSES = {num_classes}); "
                    "fix the annotation file or the number of classes."
                )
            problem = _box_problem(ann, record.get("width"), record.get("height"))
            if problem:
                counts["dropped_boxes"] += 1
                if len(examples) < 3:
                    examples.append(f"{describe_image(record)}: {problem}")
                continue
            kept.append(ann)
        counts["boxes"] += len(anns)
        if len(kept) != len(anns):
            counts["images_with_dropped_boxes"] += 1
            record = copy.copy(record)
            record["annotations"] = kept
        if filter_empty and not any(a.get("iscrowd", 0) == 0 for a in kept):
            counts["removed_images"] += 1
            continue
        out.append(record)
    if missing:
        raise DataError(
            f"{len(missing)} image file(s){where} do not exist, e.g. {', '.join(missing[:5])}."
        )
    if counts["boxes"] and counts["dropped_boxes"] == counts["boxes"]:
        raise DataError(
            f"No usable box left{where}: all {counts['boxes']} boxes are unusable (degenerate, negative, "
            f"non-finite or outside their image), e.g. " + "; ".join(examples) + ". Training would see "
            "background only: check the annotations' bbox format (COCO: [x, y, width, height] in pixels) and "
            "the images' width/height."
        )
    if counts["dropped_boxes"]:
        logger.warning(
            f"Dropped {counts['dropped_boxes']} unusable boxes (degenerate, negative, non-finite or outside "
            "the image) in "
            f"{counts['images_with_dropped_boxes']} images{where}; e.g. " + "; ".join(examples)
        )
    if counts["removed_images"]:
        logger.warning(
            f"Removed {counts['removed_images']} images{where} left without usable annotations; "
            f"{len(out)} images left."
        )
    return out, counts
