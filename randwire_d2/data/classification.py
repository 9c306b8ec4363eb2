"""Classification data: ImageFolder-style datasets (ImageNet), Fashion-MNIST, the
classification mapper and the train/test loaders used by ``RandWireClassifier``.

Dataset dicts are tiny (``{"file_name", "label", "image_id"}`` or, for in-memory
datasets, ``{"image_array", "label", "image_id"}``) so that detectron2's
``DatasetFromList`` keeps the 1.28M ImageNet entries in one serialized buffer that
data-loader workers share instead of copy.

Registered names:

* ``imagenet_train`` / ``imagenet_val``: ``<root>/train/<wnid>/*.JPEG`` and
  ``<root>/val/<wnid>/*.JPEG``. ``<root>`` is, in order: ``cfg.DATASETS.IMAGENET_ROOT``
  (applied by the loaders / :func:`randwire_d2.solver.resolve_schedule`), the
  environment variable ``RANDWIRE_IMAGENET_ROOT``, ``$DETECTRON2_DATASETS/imagenet``,
  ``./datasets/imagenet``. Resolved when the dataset is first listed, not at import.
* ``fashion_mnist_train`` / ``fashion_mnist_test``: the idx files of Debian's
  ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist`` (or
  ``RANDWIRE_FASHION_MNIST_ROOT``), decoded once per process into memory.
* any ImageFolder-style tree with :func:`register_image_folder`.
"""
import functools
import gzip
import io
import logging
import math
import os
import random
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.utils.data as torchdata
from PIL import Image

from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import InferenceSampler

from .device_decode import (
    FLIPS,
    DecodedLoader,
    DeviceDecoder,
    ImageBatch,
    encoded_collator,
    resolve_decode_device,
)
from .resumable import ResumableTrainLoader, training_seed

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassificationDatasetMapper",
    "batch_collator",
    "build_classification_test_loader",
    "build_classification_train_loader",
    "check_classification_datasets",
    "fashion_mnist_root",
    "imagenet_root",
    "list_image_folder",
    "load_fashion_mnist",
    "register_classification_datasets",
    "register_fashion_mnist",
    "register_image_folder",
    "register_imagenet",
    "set_imagenet_root",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_NAMES = {"imagenet_train": "train", "imagenet_val": "val"}
FASHION_MNIST_NAMES = {"fashion_mnist_train": "train", "fashion_mnist_test": "t10k"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

_IMAGENET_ROOT_OVERRIDE: Optional[str] = None


# --------------------------------------------------------------------------- folders
@functools.lru_cache(maxsize=None)
def _list_image_folder_cached(
    root: str, given_classes: Optional[Tuple[str, ...]] = None
) -> Tuple[Tuple[str, ...], Tuple[Tuple[str, int], ...]]:
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image-folder dataset root {root!r} does not exist or is not a directory "
            "(expected <root>/<class>/<image files>)."
        )
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ValueError(f"Image-folder dataset {root!r} has no class subdirectories (expected <root>/<class>/*.JPEG).")
    classes = list(given_classes) if given_classes is not None else folders
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise ValueError(
            f"Image-folder dataset {root!r} has class folders {unknown[:5]} that are not in the class list it was "
            f"registered with ({len(classes)} classes)."
        )
    items: List[Tuple[str, int]] = []
    for cls in folders:
        label = classes.index(cls)
        cls_dir = os.path.join(root, cls)
        names = sorted(
            e.name for e in os.scandir(cls_dir)
            if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
        )
        items.extend((os.path.join(cls_dir, n), label) for n in names)
    if not items:
        raise ValueError(
            f"Image-folder dataset {root!r} has {len(classes)} class folders but no images "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    return tuple(classes), tuple(items)


def list_image_folder(root: str, classes: Optional[Sequence[str]] = None) -> Tuple[List[str], List[Dict]]:
    """(classes, dataset dicts) of an ImageFolder tree: class = subfolder, sorted,
    label = its index; or, with ``classes``, label = the folder's index in that list
    (every folder must be in it; a class may have no folder). The listing is cached per
    process (an ImageNet scan is seconds)."""
    given = tuple(classes) if classes is not None else None
    classes, items = _list_image_folder_cached(os.path.abspath(os.path.expanduser(root)), given)
    dicts = [{"file_name": f, "label": label, "image_id": i} for i, (f, label) in enumerate(items)]
    return list(classes), dicts


def _folder_loader(name: str, root_fn: Callable[[], str], given_classes=None) -> Callable[[], List[Dict]]:
    def load():
        root = root_fn()
        classes, dicts = list_image_folder(root, given_classes)
        meta = MetadataCatalog.get(name)
        if meta.get("classes", None) is None:
            meta.set(classes=classes, image_root=root)
        elif list(meta.classes) != classes:
            raise ValueError(
                f"Dataset {name!r}: the class folders under {root!r} differ from the metadata "
                f"already registered ({len(meta.classes)} classes vs {len(classes)})."
            )
        return dicts

    return load


def register_image_folder(
    name: str,
    root: Union[str, Callable[[], str]],
    *,
    evaluator_type="classification",
    classes: Optional[Sequence[str]] = None,
) -> str:
    """Register an ImageFolder-style dataset (``root/<class>/<image>``) as ``name``.

    Lazy: the tree is listed on the first ``DatasetCatalog.get(name)``, which also sets
    the metadata ``classes``. ``root`` may be a callable returning the path (resolved at
    listing time). Registering the same name again is a no-op when it points at the
    same root and an error otherwise.

    ``classes``: the explicit class list (label = index in it), e.g. the training
    split's classes for a validation split that lacks some class folders. Without it
    the classes are the sorted folder names, and training refuses train/val splits
    whose lists differ (labels would shift).
    """
    root_fn = root if callable(root) else (lambda r=os.path.abspath(os.path.expanduser(root)): r)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        same = callable(root) or meta.get("image_root_spec", None) == root_fn()
        if not same:
            raise ValueError(
                f"Dataset {name!r} is already registered with root {meta.get('image_root_spec', None)!r}; "
                f"refusing to re-register it with {root_fn()!r}."
            )
        return name
    DatasetCatalog.register(name, _folder_loader(name, root_fn, tuple(classes) if classes is not None else None))
    meta = MetadataCatalog.get(name)
    meta.set(evaluator_type=evaluator_type)
    if not callable(root):
        meta.set(image_root_spec=root_fn())
    return name


# --------------------------------------------------------------------------- ImageNet
def set_imagenet_root(root: Optional[str]) -> None:
    """Point ``imagenet_train``/``imagenet_val`` at ``root`` (from cfg.DATASETS.IMAGENET_ROOT).

    Must happen before they are listed; changing it afterwards in the same process
    is refused because the listing and metadata are already cached.
    """
    global _IMAGENET_ROOT_OVERRIDE
    if not root:
        return
    root = os.path.abspath(os.path.expanduser(root))
    for name in IMAGENET_NAMES:
        listed = MetadataCatalog.get(name).get("image_root", None)
        if listed is not None and not listed.startswith(root + os.sep):
            raise ValueError(
                f"{name} was already listed from {listed!r}; cannot switch its root to {root!r} in this process."
            )
    _IMAGENET_ROOT_OVERRIDE = root


def imagenet_root() -> str:
    if _IMAGENET_ROOT_OVERRIDE:
        return _IMAGENET_ROOT_OVERRIDE
    env = os.environ.get("RANDWIRE_IMAGENET_ROOT")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.abspath(os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "imagenet"))


def _imagenet_split_root(split: str) -> str:
    root = imagenet_root()
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"ImageNet {split} folder {path!r} not found. Expected <root>/train/<wnid>/*.JPEG and "
            f"<root>/val/<wnid>/*.JPEG; set the root with DATASETS.IMAGENET_ROOT in the config or the "
            f"RANDWIRE_IMAGENET_ROOT environment variable (now resolved to {root!r})."
        )
    return path


def register_imagenet() -> None:
    for name, split in IMAGENET_NAMES.items():
        register_image_folder(name, lambda split=split: _imagenet_split_root(split))


# --------------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_root() -> str:
    return os.environ.get("RANDWIRE_FASHION_MNIST_ROOT", FASHION_MNIST_DEFAULT_ROOT)


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"not an unsigned-byte idx file (magic {data[:4].hex()})")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise ValueError(f"Cannot decode idx file {path!r}: {exc}") from exc


def _find_idx(root: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root!r}. Install Debian's "
        f"`dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist) or set "
        f"RANDWIRE_FASHION_MNIST_ROOT to a folder holding the idx files."
    )


@functools.lru_cache(maxsize=None)
def load_fashion_mnist(root: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of split "train" or "t10k"; cached."""
    images = _read_idx(_find_idx(root, f"{split}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, f"{split}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split} in {root!r}: {images.shape} images vs {labels.shape} labels.")
    return images, labels


def _fashion_mnist_dicts(split: str) -> List[Dict]:
    images, labels = load_fashion_mnist(fashion_mnist_root(), split)
    return [
        {"image_array": images[i], "label": int(labels[i]), "image_id": i, "height": 28, "width": 28}
        for i in range(len(labels))
    ]


def register_fashion_mnist() -> None:
    for name, split in FASHION_MNIST_NAMES.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda split=split: _fashion_mnist_dicts(split))
        MetadataCatalog.get(name).set(classes=list(FASHION_MNIST_CLASSES), evaluator_type="classification")


def register_classification_datasets() -> None:
    """Register imagenet_{train,val} and fashion_mnist_{train,test} (idempotent, lazy)."""
    register_imagenet()
    register_fashion_mnist()


# --------------------------------------------------------------------------- mapper
def _random_resized_crop_box(width: int, height: int, scale, ratio, rng: random.Random):
    """Box (left, top, right, bottom) of an Inception-style random crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    # fallback: central crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _center_crop_box(width: int, height: int, size: int):
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


class ClassificationDatasetMapper:
    """Dataset dict -> ``{"image": uint8 CHW tensor in cfg.INPUT.FORMAT, "label": int, ...}``.

    Training (``INPUT.CLS_TRAIN_AUG``):
      * ``"random_resized_crop"`` (ImageNet): Inception crop with area in
        ``INPUT.CLS_CROP_SCALE`` and aspect ratio in [3/4, 4/3], resized to
        ``INPUT.CROP_SIZE``, then a flip (``INPUT.RANDOM_FLIP``);
      * ``"pad_crop"`` (small images): the evaluation transform, then zero padding by
        ``INPUT.CLS_PAD`` and a random ``CROP_SIZE`` crop, then the flip.
    Evaluation: shorter side to ``INPUT.RESIZE_SIZE`` and a center ``CROP_SIZE`` crop.

    Images come from ``"file_name"`` (decoded with PIL, converted to RGB) or from an
    in-memory ``"image_array"`` (HW gray or HWC RGB uint8; gray is replicated to three
    channels). Nothing else is done per image: normalisation happens on the GPU in
    the model. Unreadable files raise an error naming the file.

    The random draws of an image (crop, padding offset, flip) form its crop plan
    (:meth:`plan`). With ``decode_device`` (a torch device, or "auto": CUDA when available;
    from ``INPUT.CLS_DECODE``, see
    :mod:`randwire_d2.data.device_decode`) the mapper only reads the file and draws the
    plan; the loader's :class:`~randwire_d2.data.device_decode.DeviceDecoder` decodes and
    applies it on that device.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        crop_size: int = 224,
        resize_size: int = 256,
        image_format: str = "RGB",
        train_augmentation: str = "random_resized_crop",
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        pad: int = 4,
        flip: str = "horizontal",
        decode_device: Optional[str] = None,
    ):
        if train_augmentation not in ("random_resized_crop", "pad_crop"):
            raise ValueError(
                f"INPUT.CLS_TRAIN_AUG = {train_augmentation!r} is invalid: 'random_resized_crop' or 'pad_crop'."
            )
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT = {image_format!r} is not supported for classification: RGB or BGR.")
        if flip not in ("horizontal", "vertical", "none"):
            raise ValueError(f"INPUT.RANDOM_FLIP = {flip!r} is invalid: 'horizontal', 'vertical' or 'none'.")
        if not (int(crop_size) > 0 and int(resize_size) >= int(crop_size)):
            raise ValueError(
                f"INPUT.CROP_SIZE ({crop_size}) and INPUT.RESIZE_SIZE ({resize_size}) must satisfy 0 < crop <= resize."
            )
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"INPUT.CLS_CROP_SCALE = {list(crop_scale)} is invalid: 0 < min <= max <= 1.")
        self.is_train = is_train
        self.crop_size = int(crop_size)
        self.resize_size = int(resize_size)
        self.image_format = image_format
        self.train_augmentation = train_augmentation
        self.crop_scale = tuple(float(s) for s in crop_scale)
        self.crop_ratio = tuple(float(r) for r in crop_ratio)
        self.pad = int(pad)
        self.flip = flip
        if decode_device == "auto":  # LazyConfig's default: the GPU when there is one
            decode_device = "cuda" if torch.cuda.is_available() else None
        self.decode_device = decode_device

    @property
    def _rng(self):
        # python's global RNG, seeded per image by the resumable loader; a property, not an
        # attribute: a module does not pickle, and spawned loader workers (the default in
        # the processes of a multi-GPU / multi-process run) receive the mapper pickled
        return random

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "crop_size": cfg.INPUT.CROP_SIZE,
            "resize_size": cfg.INPUT.RESIZE_SIZE,
            "image_format": cfg.INPUT.FORMAT,
            "train_augmentation": cfg.INPUT.CLS_TRAIN_AUG,
            "crop_scale": tuple(cfg.INPUT.CLS_CROP_SCALE),
            "pad": cfg.INPUT.CLS_PAD,
            "flip": cfg.INPUT.RANDOM_FLIP,
            "decode_device": resolve_decode_device(cfg.INPUT.get("CLS_DECODE", "cpu"), cfg.MODEL.DEVICE),
        }

    # -- decoding
    @staticmethod
    def load_image(dataset_dict: Dict) -> Image.Image:
        """The dict's image as an RGB PIL image (errors name the file)."""
        if "image_array" in dataset_dict:
            array = np.asarray(dataset_dict["image_array"])
            if array.dtype != np.uint8 or array.ndim not in (2, 3):
                raise ValueError(
                    f"image_array of image_id {dataset_dict.get('image_id')} must be uint8 HW or HWC, "
                    f"got {array.dtype} {array.shape}."
                )
            return Image.fromarray(array).convert("RGB")
        path = dataset_dict["file_name"]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img = img.convert("RGB")  # forces the decode while the file is open
        except Exception as exc:  # PIL raises several types for truncated/corrupt files
            raise ValueError(f"Cannot read image {path!r}: {type(exc).__name__}: {exc}") from exc
        return img

    # -- transforms
    def plan(self, width: int, height: int):
        """The crop plan (:data:`~randwire_d2.data.device_decode.CropPlan`) of a ``width`` x
        ``height`` image, drawing from the mapper's RNG (seeded per image by the loader)."""
        size = self.crop_size
        box, shift = (0, 0, width, height), (0, 0)
        if self.is_train and self.train_augmentation == "random_resized_crop":
            box = _random_resized_crop_box(width, height, self.crop_scale, self.crop_ratio, self._rng)
            resized, crop = (size, size), (0, 0)
        else:  # shorter side to RESIZE_SIZE (at least CROP_SIZE), center crop
            scale = self.resize_size / min(width, height)
            resized = (max(size, int(round(width * scale))), max(size, int(round(height * scale))))
            crop = _center_crop_box(*resized, size)[:2]
            if self.is_train and self.pad > 0:  # pad_crop: a CROP_SIZE window of the zero-padded crop
                top, left = self._rng.randint(0, 2 * self.pad), self._rng.randint(0, 2 * self.pad)
                shift = (left - self.pad, top - self.pad)
        flip = 0
        if self.is_train and self.flip != "none" and self._rng.random() < 0.5:
            flip = FLIPS[self.flip]
        return (*box, *resized, *crop, *shift, flip)

    def transform(self, img: Image.Image) -> np.ndarray:
        """PIL RGB image -> HWC uint8 array of CROP_SIZE x CROP_SIZE."""
        return self._apply(img, self.plan(*img.size))

    def _apply(self, img: Image.Image, plan) -> np.ndarray:
        size = self.crop_size
        left, top, right, bottom, rw, rh, cx, cy, dx, dy, flip = plan
        if self.is_train and self.train_augmentation == "random_resized_crop":
            # crop + resize in one resampling pass (antialiased when shrinking)
            array = np.asarray(img.resize((rw, rh), Image.BILINEAR, box=(left, top, right, bottom)))
        else:
            if (rw, rh) != img.size:
                img = img.resize((rw, rh), Image.BILINEAR)
            if (rw, rh) != (size, size):
                img = img.crop((cx, cy, cx + size, cy + size))
            array = np.asarray(img)
        if self.is_train and self.train_augmentation == "pad_crop" and self.pad > 0:
            p = self.pad
            array = np.pad(array, ((p, p), (p, p), (0, 0)))[p + dy : p + dy + size, p + dx : p + dx + size]
        if flip:
            array = array[:, ::-1] if flip == FLIPS["horizontal"] else array[::-1]
        return array

    def _encode(self, dataset_dict: Dict) -> Dict:
        """The device path's worker half: the file's bytes (or, for what is not an RGB/gray
        JPEG, PIL's pixels) and the crop plan."""
        out = {k: v for k, v in dataset_dict.items() if k != "image_array"}
        out["label"] = int(dataset_dict["label"])
        if "image_array" in dataset_dict:
            img = self.load_image(dataset_dict)
        else:
            path = dataset_dict["file_name"]
            try:
                with open(path, "rb") as f:
                    raw = f.read()
                img = Image.open(io.BytesIO(raw))  # reads the header only
                if img.format == "JPEG" and img.mode in ("RGB", "L"):
                    out["crop_plan"] = self.plan(*img.size)
                    out["encoded"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                    return out
                img = img.convert("RGB")
            except Exception as exc:  # PIL raises several types for truncated/corrupt files
                raise ValueError(f"Cannot read image {path!r}: {type(exc).__name__}: {exc}") from exc
        out["crop_plan"] = self.plan(*img.size)
        out["pixels"] = torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))
        return out

    def __call__(self, dataset_dict: Dict) -> Dict:
        if self.decode_device is not None:
            return self._encode(dataset_dict)
        array = self.transform(self.load_image(dataset_dict))
        if self.image_format == "BGR":
            array = array[:, :, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        out = {k: v for k, v in dataset_dict.items() if k != "image_array"}
        out["image"] = image
        out["label"] = int(dataset_dict["label"])
        out["height"], out["width"] = image.shape[1:]
        return out


# --------------------------------------------------------------------------- loaders
def classification_dicts(names) -> List[Dict]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("No dataset given (cfg.DATASETS.TRAIN / TEST is empty).")
    dicts: List[Dict] = []
    for name in names:
        d = DatasetCatalog.get(name)
        if not d:
            raise ValueError(f"Dataset {name!r} is empty.")
        if "label" not in d[0]:
            raise ValueError(f"Dataset {name!r} has no 'label' field: it is not a classification dataset.")
        dicts.extend(d)
    return dicts


def _class_list(name: str, dicts: List[Dict]) -> Tuple[Optional[List[str]], int]:
    """(the dataset's class names if known, 1 + its largest label)."""
    classes = MetadataCatalog.get(name).get("classes", None)
    return (list(classes) if classes is not None else None), 1 + max(int(d["label"]) for d in dicts)


def check_classification_datasets(cfg) -> None:
    """Training and evaluation datasets must share one class list (labels are indices in
    it: a class folder missing in one split shifts every label after it) and agree with
    MODEL.RANDWIRE.NUM_CLASSES."""
    set_imagenet_root(cfg.DATASETS.get("IMAGENET_ROOT", ""))
    listed = [
        (key, name, *_class_list(name, classification_dicts(name)))
        for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST))
        for name in names
    ]
    named = [(name, classes) for _, name, classes, _ in listed if classes is not None]
    for name, classes in named[1:]:
        ref_name, ref = named[0]
        if classes != ref:
            only_ref = [c for c in ref if c not in classes]
            only_this = [c for c in classes if c not in ref]
            raise ValueError(
                f"Datasets {ref_name!r} and {name!r} have different class lists ({len(ref)} vs {len(classes)} "
                f"classes; only in {ref_name!r}: {only_ref[:5]}, only in {name!r}: {only_this[:5]}"
                f"{'' if only_ref or only_this else ', the same classes in another order'}): labels are class "
                "indices, so they would not mean the same class. Make the class folders match, or register "
                f"{name!r} with register_image_folder(..., classes=<the training classes>)."
            )
    num_classes = cfg.MODEL.RANDWIRE.NUM_CLASSES
    for key, name, classes, num_labels in listed:
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"cfg.MODEL.RANDWIRE.NUM_CLASSES = {num_classes} but {key} dataset {name!r} has {len(classes)} "
                f"classes: set MODEL.RANDWIRE.NUM_CLASSES {len(classes)}."
            )
        if num_labels > num_classes:
            raise ValueError(
                f"cfg.MODEL.RANDWIRE.NUM_CLASSES = {num_classes} but {key} dataset {name!r} has labels up to "
                f"{num_labels - 1}: set MODEL.RANDWIRE.NUM_CLASSES {num_labels}."
            )


def batch_collator(batch: List[Dict]) -> List[Dict]:
    """Keep detectron2's list-of-dicts batches, but stack equal-size images into one
    tensor whose rows the dicts view (an :class:`~randwire_d2.data.device_decode.ImageBatch`):
    a worker then hands one shared-memory block per batch to the main process instead of
    one per image (measured: ~2.5x less transfer overhead per image), the loader pins it
    once, and the model copies it to the GPU in one ``non_blocking`` copy."""
    if not batch or len({tuple(d["image"].shape) for d in batch}) != 1:
        return batch
    return ImageBatch.stack(batch)


def _device_decoder(mapper) -> Optional[DeviceDecoder]:
    device = getattr(mapper, "decode_device", None)
    if device is None:
        return None
    return DeviceDecoder(device, mapper.crop_size, mapper.image_format)


def _loader_kwargs(num_workers: int, prefetch_factor: int) -> Dict:
    kwargs = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available()}
    if num_workers > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = max(2, int(prefetch_factor))
    return kwargs


def build_classification_train_loader(cfg, mapper=None):
    """Infinite loader of lists of mapped dicts, ``SOLVER.IMS_PER_BATCH / world size`` per
    process (per GPU), resumable exactly (see :mod:`randwire_d2.data.resumable`).

    Beyond what v0.6's ``build_detection_train_loader`` can pass on: pinned memory when
    CUDA is available, persistent workers and ``DATALOADER.CLS_PREFETCH_FACTOR``; batches
    are stacked in the workers (:func:`batch_collator`). Aspect-ratio grouping is
    pointless for fixed-size crops and is not used.
    """
    return classification_train_loader(
        cfg.DATASETS.TRAIN,
        mapper if mapper is not None else ClassificationDatasetMapper(cfg, True),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        seed=training_seed(cfg),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        prefetch_factor=cfg.DATALOADER.get("CLS_PREFETCH_FACTOR", 2),
        imagenet_root=cfg.DATASETS.get("IMAGENET_ROOT", ""),
    )


def classification_train_loader(
    names, mapper, *, total_batch_size: int, seed: int, num_workers: int = 0, prefetch_factor: int = 2,
    imagenet_root: str = "",
):
    """:func:`build_classification_train_loader` with explicit arguments (LazyConfig)."""
    set_imagenet_root(imagenet_root)
    kwargs = _loader_kwargs(num_workers, prefetch_factor)
    decoder = _device_decoder(mapper)
    return ResumableTrainLoader(
        classification_dicts(names),
        mapper,
        total_batch_size=total_batch_size,
        seed=seed,
        num_workers=kwargs.pop("num_workers"),
        collate_fn=batch_collator if decoder is None else encoded_collator,
        loader_kwargs=kwargs,
        batch_transform=decoder,
    )


def build_classification_test_loader(cfg, dataset_name, mapper=None):
    """Loader over every image of ``dataset_name`` exactly once across processes
    (detectron2's ``InferenceSampler``), ``TEST.IMS_PER_BATCH`` images per process and
    batch (v0.6's ``build_detection_test_loader`` is fixed at 1)."""
    return classification_test_loader(
        dataset_name,
        mapper if mapper is not None else ClassificationDatasetMapper(cfg, False),
        batch_size=int(cfg.TEST.get("IMS_PER_BATCH", 1)),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        prefetch_factor=cfg.DATALOADER.get("CLS_PREFETCH_FACTOR", 2),
        imagenet_root=cfg.DATASETS.get("IMAGENET_ROOT", ""),
    )


def classification_test_loader(
    names, mapper, *, batch_size: int, num_workers: int = 0, prefetch_factor: int = 2, imagenet_root: str = ""
):
    """:func:`build_classification_test_loader` with explicit arguments (LazyConfig)."""
    set_imagenet_root(imagenet_root)
    dicts = classification_dicts(names)
    if batch_size <= 0:
        raise ValueError(f"TEST.IMS_PER_BATCH must be positive, got {batch_size}.")
    dataset = MapDataset(DatasetFromList(dicts, copy=False), mapper)
    kwargs = _loader_kwargs(num_workers, prefetch_factor)
    kwargs.pop("persistent_workers", None)  # evaluation is periodic: don't pin workers in between
    decoder = _device_decoder(mapper)
    loader = torchdata.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InferenceSampler(len(dataset)),
        drop_last=False,
        collate_fn=batch_collator if decoder is None else encoded_collator,
        **kwargs,
    )
    return loader if decoder is None else DecodedLoader(loader, decoder)
