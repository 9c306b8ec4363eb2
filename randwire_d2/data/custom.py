"""Your own detection datasets, registered from the config (no wrapper script needed).

Config keys (added by ``randwire_d2.config.add_dataset_config``)::

    DATASETS:
      COCO_JSON:   # [name, json_file, image_root], as detectron2's register_coco_instances
        - ["my_train", "datasets/my/annotations/train.json", "datasets/my/images"]
        - ["my_val", "datasets/my/annotations/val.json", "datasets/my/images"]
      VOC:         # [name, dirname, split, [class names]]: Pascal VOC layout
        - ["my_voc_train", "datasets/my_voc", "train", ["cat", "dog"]]
      TRAIN: ("my_train",)
      TEST: ("my_val",)

or on the command line, e.g. ``DATASETS.COCO_JSON "[['my_val', 'val.json', 'images']]"``.
:func:`register_custom_datasets` runs inside ``setup_cfg``, i.e. in every process of a
multi-process run. COCO json datasets are evaluated with ``COCOEvaluator``, VOC ones with
``PascalVOCDetectionEvaluator`` (``dirname`` holds ``Annotations/*.xml``,
``JPEGImages/*.jpg`` and ``ImageSets/Main/<split>.txt``; AP over the continuous PR curve,
as for VOC2010+, not the 11-point VOC2007 metric).

Before training or evaluation, :func:`check_detection_datasets` refuses a dataset whose
files are missing (with the ``DETECTRON2_DATASETS`` hint for detectron2's builtin ones)
and a model whose class count differs from the dataset's.
"""
import json
import logging
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .validation import DataError

__all__ = [
    "check_dataset_classes",
    "check_detection_datasets",
    "dataset_class_names",
    "load_voc_detection",
    "register_custom_datasets",
    "resolve_num_classes",
]

logger = logging.getLogger(__name__)

VOC_YEAR = 2012  # PascalVOCDetectionEvaluator: 2007 -> 11-point AP, anything else -> area AP
BUILTIN_HINT = (
    "detectron2's builtin datasets are read from $DETECTRON2_DATASETS ({where}), in the layout "
    "of detectron2's datasets/README.md: set DETECTRON2_DATASETS to the folder holding coco/, "
    "VOC2007/, ... For your own data use DATASETS.COCO_JSON or DATASETS.VOC (README: Your own dataset)."
)

# name -> spec of the datasets this module registered (to re-register on a changed spec)
_REGISTERED: Dict[str, tuple] = {}


def _entries(cfg, key: str, form: str, sizes: Sequence[int]):
    entries = cfg.DATASETS.get(key, [])
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"cfg.DATASETS.{key} = {entries!r}: expected a list of {form}.")
    for i, entry in enumerate(entries):
        ok = isinstance(entry, (list, tuple)) and len(entry) in sizes
        ok = ok and all(isinstance(v, str) and v for v in entry[:3])
        if not ok:
            raise ValueError(f"cfg.DATASETS.{key}[{i}] = {entry!r}: expected {form}.")
        yield i, list(entry)


def _register(name: str, spec: tuple, key: str, register, seen: List[str]) -> None:
    if name in seen:
        raise ValueError(f"cfg.DATASETS.{key}: dataset name {name!r} is used twice in DATASETS.COCO_JSON / VOC.")
    seen.append(name)
    if _REGISTERED.get(name) == spec:
        return
    if name in DatasetCatalog.list():
        if name not in _REGISTERED:
            raise ValueError(
                f"cfg.DATASETS.{key}: dataset name {name!r} is already registered (a builtin "
                "dataset, or one registered in code): choose another name."
            )
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    register()
    _REGISTERED[name] = spec


def register_custom_datasets(cfg) -> List[str]:
    """Register the datasets of cfg.DATASETS.COCO_JSON and cfg.DATASETS.VOC (idempotent;
    nothing is read until a dataset is used). Returns their names."""
    from detectron2.data.datasets import register_coco_instances

    names = []
    form = "[name, json_file, image_root]"
    for i, (name, json_file, image_root) in _entries(cfg, "COCO_JSON", form, (3,)):
        spec = ("coco", json_file, image_root, i)

        def register(name=name, json_file=json_file, image_root=image_root, i=i):
            register_coco_instances(name, {}, json_file, image_root)
            MetadataCatalog.get(name).set(config_key=f"DATASETS.COCO_JSON[{i}]")

        _register(name, spec, f"COCO_JSON[{i}]", register, names)
    form = "[name, dirname, split, [class names]]"
    for i, entry in _entries(cfg, "VOC", form, (3, 4)):
        classes = entry[3] if len(entry) == 4 else None
        if not classes or not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) and c for c in classes):
            raise ValueError(
                f"cfg.DATASETS.VOC[{i}] = {entry!r}: expected {form}; the class names (a non-empty "
                "list, in the order of the model's class ids) are required."
            )
        if len(set(classes)) != len(classes):
            raise ValueError(f"cfg.DATASETS.VOC[{i}]: class names {list(classes)} contain duplicates.")
        name, dirname, split = entry[:3]
        classes = [str(c) for c in classes]
        spec = ("voc", dirname, split, tuple(classes), i)

        def register(name=name, dirname=dirname, split=split, classes=classes, i=i):
            DatasetCatalog.register(name, lambda: load_voc_detection(dirname, split, classes, name))
            MetadataCatalog.get(name).set(
                thing_classes=list(classes), dirname=dirname, split=split, year=VOC_YEAR,
                evaluator_type="pascal_voc", config_key=f"DATASETS.VOC[{i}]",
            )

        _register(name, spec, f"VOC[{i}]", register, names)
    return names


# ----------------------------------------------------------------------------- VOC
def _voc_text(node, tag: str, path: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DataError(f"VOC annotation {path!r}: missing <{tag}>.")
    return child.text.strip()


def load_voc_detection(dirname: str, split: str, class_names: Sequence[str], dataset_name: str = "") -> List[Dict]:
    """Dataset dicts of a Pascal-VOC layout folder (detectron2's conventions: every object,
    difficult ones included, ``bbox`` XYXY with the 1-based VOC origin moved to 0). Errors
    name the file; objects need the fields the VOC evaluator reads (name, pose, truncated,
    difficult, bndbox)."""
    ids_file = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(ids_file):
        raise DataError(
            f"dataset {dataset_name!r}: {ids_file!r} does not exist (VOC layout: Annotations/<id>.xml, "
            f"JPEGImages/<id>.jpg, ImageSets/Main/{split}.txt listing the ids)."
        )
    with open(ids_file) as f:
        ids = [line.strip() for line in f if line.strip()]
    index = {c: i for i, c in enumerate(class_names)}
    dicts = []
    for fileid in ids:
        path = os.path.join(dirname, "Annotations", fileid + ".xml")
        try:
            tree = ET.parse(path)
        except (OSError, ET.ParseError) as exc:
            raise DataError(f"dataset {dataset_name!r}: cannot read VOC annotation {path!r}: {exc}") from None
        size = tree.find("size")
        if size is None:
            raise DataError(f"VOC annotation {path!r}: missing <size>.")
        record = {
            "file_name": os.path.join(dirname, "JPEGImages", fileid + ".jpg"),
            "image_id": fileid,
            "height": int(_voc_text(size, "height", path)),
            "width": int(_voc_text(size, "width", path)),
        }
        annotations = []
        for obj in tree.findall("object"):
            cls = _voc_text(obj, "name", path)
            if cls not in index:
                raise DataError(
                    f"VOC annotation {path!r}: class {cls!r} is not among the class names of dataset "
                    f"{dataset_name!r} {list(class_names)}: add it to its DATASETS.VOC entry."
                )
            for tag in ("pose", "truncated", "difficult"):
                _voc_text(obj, tag, path)
            box = obj.find("bndbox")
            if box is None:
                raise DataError(f"VOC annotation {path!r}: an object without <bndbox>.")
            try:
                x0, y0, x1, y1 = (float(_voc_text(box, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError as exc:
                raise DataError(f"VOC annotation {path!r}: bad <bndbox>: {exc}") from None
            annotations.append({"category_id": index[cls], "bbox": [x0 - 1.0, y0 - 1.0, x1, y1],
                                "bbox_mode": BoxMode.XYXY_ABS})
        record["annotations"] = annotations
        dicts.append(record)
    return dicts


# ----------------------------------------------------------------------------- checks
def _coco_class_names(json_file: str) -> List[str]:
    """Category names sorted by id: the contiguous class ids load_coco_json assigns."""
    try:
        with open(json_file) as f:
            cats = json.load(f).get("categories")
        return [str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DataError(f"Cannot read the categories of COCO json {json_file!r}: {type(exc).__name__}: {exc}") from None


def dataset_class_names(name: str) -> Optional[List[str]]:
    """The dataset's class names (metadata ``thing_classes``); for a COCO json not loaded yet,
    read from its categories (and kept in the metadata). None if unknown."""
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes", None)
    if classes is None and meta.get("json_file", None) and os.path.isfile(meta.json_file):
        classes = _coco_class_names(meta.json_file)
        meta.thing_classes = classes
    return list(classes) if classes is not None else None


def _num_classes_key(cfg) -> Optional[str]:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return "MODEL.RETINANET.NUM_CLASSES"
    if arch == "ProposalNetwork":
        return None
    return "MODEL.ROI_HEADS.NUM_CLASSES"


def resolve_num_classes(cfg) -> Optional[str]:
    """``NUM_CLASSES 0`` (the fine-tuning template's default) means the class count of the
    training dataset (DATASETS.TRAIN[0], else TEST[0]): set it in ``cfg``; returns a message."""
    key = _num_classes_key(cfg)
    if key is None:
        return None
    section, leaf = key.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
        node = node[part]
    if node[leaf] != 0:
        return None
    which, names = ("DATASETS.TRAIN", cfg.DATASETS.TRAIN) if cfg.DATASETS.TRAIN else ("DATASETS.TEST", cfg.DATASETS.TEST)
    try:  # a dataset that cannot tell: 0 stays, and the dataset checks say what is wrong
        check_dataset_files(names[:1], which)
        classes = dataset_class_names(names[0]) if names else None
    except (ValueError, FileNotFoundError):
        return None
    if not classes:
        return None
    node[leaf] = len(classes)
    return f"cfg.{key} = 0 is replaced by {len(classes)}: the classes of dataset {names[0]!r} ({which})"


def check_dataset_classes(cfg, names: Sequence[str], num_classes: Optional[int] = None) -> None:
    """Refuse datasets whose class count differs from the model's (``num_classes``, else the
    config's), before any training or inference runs on them."""
    key = _num_classes_key(cfg)
    if key is None:
        return
    node = cfg
    for part in key.split(".")[:-1]:
        node = node[part]
    configured = int(node[key.split(".")[-1]])
    if num_classes is None or num_classes == configured:
        num_classes, what = configured, f"cfg.{key} = {configured}"
        fix = f"set {key} {{n}} (weights trained on other classes still load: their class-specific layers are re-initialised)"
    else:  # a model built with another config
        what = f"The model predicts {num_classes} classes (cfg.{key} = {configured})"
        fix = "use a model built for {n} classes"
    for name in names:
        classes = dataset_class_names(name)
        if classes is None:
            logger.warning(f"Dataset {name!r} declares no class names: its class count is not checked.")
            continue
        if len(classes) != num_classes:
            shown = classes if len(classes) <= 12 else classes[:12] + ["..."]
            raise ValueError(
                f"{what}, but dataset {name!r} has {len(classes)} classes {shown}: "
                + fix.format(n=len(classes)) + "."
            )


def _missing_files(name: str) -> List[str]:
    meta = MetadataCatalog.get(name)
    if meta.get("generated_on_demand", False):
        return []
    paths = [meta.get(k, None) for k in ("json_file", "image_root", "dirname")]
    return [p for p in paths if p and "://" not in p and not os.path.exists(p)]


def check_dataset_files(names: Sequence[str], key: str = "DATASETS") -> None:
    """Every dataset is registered and its annotation/image folders exist; errors say how to
    register one's own data or where detectron2 looks for its builtin ones."""
    for name in names:
        if name not in DatasetCatalog.list():
            raise ValueError(
                f"cfg.{key}: dataset {name!r} is not registered. Register your own with "
                "DATASETS.COCO_JSON [name, json_file, image_root] or DATASETS.VOC [name, dirname, split, "
                "[class names]] (README: Your own dataset)."
            )
        missing = _missing_files(name)
        if not missing:
            continue
        source = MetadataCatalog.get(name).get("config_key", None)
        if source:
            raise FileNotFoundError(f"cfg.{source} (dataset {name!r}): {missing[0]!r} does not exist.")
        root = os.environ.get("DETECTRON2_DATASETS")
        where = f"now {root!r}" if root else "unset, so ./datasets"
        raise FileNotFoundError(
            f"Dataset {name!r} (cfg.{key}) needs {missing[0]!r}, which does not exist. "
            + BUILTIN_HINT.format(where=where)
        )


def check_test_images(names: Sequence[str], key: str = "DATASETS.TEST") -> None:
    """Evaluation datasets: their records load and every image file exists (else the final
    evaluation, after the whole training, would be the first to find out); a dataset
    without any annotation is evaluated to null metrics, which is said now."""
    for name in names:
        if MetadataCatalog.get(name).get("generated_on_demand", False):
            continue
        source = MetadataCatalog.get(name).get("config_key", None) or key
        try:
            dicts = DatasetCatalog.get(name)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cfg.{source}: cannot load dataset {name!r}: {type(exc).__name__}: {exc}") from None
        missing = [d.get("file_name") for d in dicts if not os.path.isfile(str(d.get("file_name")))]
        if missing:
            raise DataError(
                f"cfg.{source}: {len(missing)} of the {len(dicts)} images of dataset {name!r} do not exist, e.g. "
                f"{missing[0]!r} (wrong image_root?)."
            )
        if dicts and all("annotations" in d for d in dicts) and not any(d["annotations"] for d in dicts):
            logger.warning(
                f"Dataset {name!r} ({source}) has no annotations: every evaluation metric will be null."
            )


def check_detection_datasets(cfg, eval_only: bool = False) -> None:
    """Pre-flight of a detection run: the datasets it will use exist (the evaluation's down to
    each image) and match NUM_CLASSES."""
    groups = [("DATASETS.TEST", cfg.DATASETS.TEST)]
    if not eval_only:
        groups.insert(0, ("DATASETS.TRAIN", cfg.DATASETS.TRAIN))
    for key, names in groups:
        check_dataset_files(names, key)
        check_dataset_classes(cfg, names)
    check_test_images(cfg.DATASETS.TEST)
