"""An embedded, procedurally generated detection dataset ("RandWire demo").

The dataset lets the plugin be trained and evaluated end to end without
downloading anything: images of simple shapes (five classes that differ only
by geometry; colours are random) on cluttered backgrounds, with COCO-format
annotations.

Layout written by :func:`generate_demo_dataset`::

    root/
      train/000000.jpg ...
      val/000000.jpg ...
      annotations/train.json
      annotations/val.json
      DATASET_INFO.json        # marker: generator version + parameters

Generation is deterministic (same seed, same bytes with the same Pillow /
libjpeg) and atomic: everything is written into a temporary sibling
directory which is renamed into place only when complete, so an interrupted
run never leaves a half-written dataset behind. A directory whose marker is
missing, unreadable or from another generator version is regenerated.

Datasets ``randwire_demo_train`` and ``randwire_demo_val`` are registered in
detectron2's catalogs by :func:`register_demo_datasets`; their loader
generates the data on first use.
"""
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "DEMO_CLASSES",
    "DEMO_DATASET_NAMES",
    "GENERATOR_VERSION",
    "default_demo_root",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "is_valid_demo_dataset",
    "register_demo_datasets",
]

logger = logging.getLogger(__name__)

# Bump whenever the generated content changes: existing caches regenerate.
GENERATOR_VERSION = 1
MARKER_FILE = "DATASET_INFO.json"

DEMO_CLASSES = ["circle", "rectangle", "triangle", "cross", "star"]
DEMO_DATASET_NAMES = ("randwire_demo_train", "randwire_demo_val")

DEFAULT_NUM_TRAIN = 320
DEFAULT_NUM_VAL = 80
DEFAULT_SEED = 0

# Generation parameters.
_IMG_SIZE_RANGE = (160, 320)  # width and height, each, inclusive
_OBJ_SIZE_RANGE = (16, 120)  # object extent in pixels
_MAX_OBJECTS = 6
_MIN_VISIBLE_FRACTION = 0.3  # objects more occluded than this are dropped
_MAX_COVER_OF_EXISTING = 0.4  # a new object may hide at most this much of another
_JPEG_QUALITY = 92


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------
def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_polygon(cls: str, size: float, rng: np.random.Generator) -> Optional[np.ndarray]:
    """Polygon (N, 2) centred on 0 for polygonal classes; None for circles.

    ``size`` is the object's nominal extent (its diameter-like size).
    """
    r = size / 2.0
    angle = rng.uniform(0, 2 * math.pi)
    if cls == "rectangle":
        aspect = rng.uniform(0.45, 1.0)
        w, h = r, r * aspect
        if rng.random() < 0.5:
            w, h = h, w
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
        # mostly axis-aligned-ish rectangles, sometimes rotated
        angle = angle if rng.random() < 0.5 else rng.uniform(-0.2, 0.2)
    elif cls == "triangle":
        # a (possibly irregular) triangle: three vertices near the circle
        base = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
        jitter = rng.uniform(-0.25, 0.25, size=3)
        th = base + jitter
        pts = np.stack([np.cos(th), np.sin(th)], axis=1) * r
    elif cls == "cross":
        t = r * rng.uniform(0.28, 0.4)  # half arm width
        pts = np.array(
            [
                [-t, -r], [t, -r], [t, -t], [r, -t], [r, t], [t, t],
                [t, r], [-t, r], [-t, t], [-r, t], [-r, -t], [-t, -t],
            ]
        )
        angle = angle if rng.random() < 0.4 else rng.uniform(-0.15, 0.15)
    elif cls == "star":
        n = 5
        inner = rng.uniform(0.38, 0.5)
        th = np.arange(2 * n) * math.pi / n
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
        pts = np.stack([np.cos(th) * rad, np.sin(th) * rad], axis=1)
    elif cls == "circle":
        return None
    else:  # pragma: no cover - guarded by DEMO_CLASSES
        raise ValueError(cls)
    return _rotate(pts, angle)


def _shape_mask(
    cls: str, size: float, cx: float, cy: float, width: int, height: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean (H, W) mask of one shape drawn at (cx, cy)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    poly = _shape_polygon(cls, size, rng)
    if poly is None:  # circle / mild ellipse
        r = size / 2.0
        aspect = rng.uniform(0.85, 1.0)
        rx, ry = (r, r * aspect) if rng.random() < 0.5 else (r * aspect, r)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        pts = poly + np.array([cx, cy])
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=255)
    return np.asarray(canvas) > 127


# --------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------
def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Float32 (H, W, 3) cluttered background in [0, 255]."""
    c0 = rng.uniform(0, 255, size=3)
    c1 = rng.uniform(0, 255, size=3)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = xs * math.cos(theta) + ys * math.sin(theta)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]

    # low-frequency blotches: coarse noise upsampled
    gh, gw = int(rng.integers(3, 7)), int(rng.integers(3, 7))
    coarse = rng.normal(0, 25, size=(gh, gw, 3))
    coarse_img = Image.fromarray(
        np.clip(coarse + 128, 0, 255).astype(np.uint8), "RGB"
    ).resize((width, height), Image.BICUBIC)
    img = img + (np.asarray(coarse_img, dtype=np.float32) - 128)
    return img.astype(np.float32)


def _draw_distractors(img: Image.Image, rng: np.random.Generator) -> None:
    """Thin lines, arcs and small blobs: clutter that is not an object."""
    width, height = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 9))):  # thin lines
        p = rng.uniform([0, 0, 0, 0], [width, height, width, height])
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=color, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 4))):  # thin arcs
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(10, 60)
        a0 = rng.uniform(0, 360)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.arc([cx - r, cy - r, cx + r, cy + r], a0, a0 + rng.uniform(30, 200),
                 fill=color, width=1)
    for _ in range(int(rng.integers(3, 15))):  # small blobs / dots
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(1.0, 4.0)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)


def _contrasting_color(bg_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.uniform(0, 255, size=3)
        d = float(np.abs(c - bg_mean).mean())
        if d >= 70:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


# --------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------
def _make_image(rng: np.random.Generator) -> Tuple[Image.Image, List[Dict]]:
    width = int(rng.integers(_IMG_SIZE_RANGE[0], _IMG_SIZE_RANGE[1] + 1))
    height = int(rng.integers(_IMG_SIZE_RANGE[0], _IMG_SIZE_RANGE[1] + 1))

    bg = Image.fromarray(np.clip(_background(width, height, rng), 0, 255).astype(np.uint8), "RGB")
    _draw_distractors(bg, rng)
    img = np.asarray(bg, dtype=np.float32).copy()

    # owner[y, x] = index of the object visible at that pixel, -1 = background
    owner = np.full((height, width), -1, dtype=np.int32)
    objects: List[Dict] = []
    n_target = int(rng.integers(1, _MAX_OBJECTS + 1))
    max_size = min(_OBJ_SIZE_RANGE[1], int(0.7 * min(width, height)))
    for _ in range(n_target * 4):  # bounded placement attempts
        if len(objects) >= n_target:
            break
        cls_idx = int(rng.integers(0, len(DEMO_CLASSES)))
        # log-uniform sizes: plenty of small and large objects
        size = float(np.exp(rng.uniform(math.log(_OBJ_SIZE_RANGE[0]), math.log(max_size))))
        half = size / 2.0
        # allow objects to be cut by the border a little
        cx = rng.uniform(half * 0.6, width - half * 0.6)
        cy = rng.uniform(half * 0.6, height - half * 0.6)
        mask = _shape_mask(DEMO_CLASSES[cls_idx], size, cx, cy, width, height, rng)
        area = int(mask.sum())
        if area < 60:
            continue
        # reject placements hiding too much of an existing object
        hidden = owner[mask]
        ok = True
        if hidden.size and hidden.max() >= 0:
            counts = np.bincount(hidden[hidden >= 0], minlength=len(objects))
            for j, c in enumerate(counts):
                if c and c > _MAX_COVER_OF_EXISTING * objects[j]["full_area"]:
                    ok = False
                    break
        if not ok:
            continue

        ys, xs = np.nonzero(mask)
        region = img[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].reshape(-1, 3)
        color = _contrasting_color(region.mean(axis=0), rng)
        # slight shading so objects are not perfectly flat
        shade = 1.0 + 0.15 * (rng.random() - 0.5) * (
            (np.arange(width)[None, :] - cx) / max(width, 1)
            + (np.arange(height)[:, None] - cy) / max(height, 1)
        )
        obj_pix = np.clip(color[None, None, :] * shade[..., None], 0, 255)
        img[mask] = obj_pix[mask]
        owner[mask] = len(objects)
        objects.append({"category": cls_idx, "full_area": area})

    # per-pixel sensor noise + a mild blur for antialiasing-like edges
    noise_sigma = rng.uniform(3, 12)
    img = img + rng.normal(0, noise_sigma, size=img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=0.6))

    anns = []
    for j, obj in enumerate(objects):
        vis = owner == j
        vis_area = int(vis.sum())
        if vis_area < _MIN_VISIBLE_FRACTION * obj["full_area"] or vis_area < 40:
            continue
        ys, xs = np.nonzero(vis)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        anns.append(
            {
                "category_id": obj["category"] + 1,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(vis_area),
                "iscrowd": 0,
            }
        )
    return pil, anns


# --------------------------------------------------------------------------
# Whole dataset
# --------------------------------------------------------------------------
def _split_seed(seed: int, split: str) -> np.random.Generator:
    # independent, stable streams per split (val does not depend on num_train)
    key = {"train": 0, "val": 1}[split]
    return np.random.Generator(np.random.PCG64([int(seed), key, GENERATOR_VERSION]))


def _write_split(root: str, split: str, num_images: int, seed: int) -> Dict:
    img_dir = os.path.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    rng = _split_seed(seed, split)
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        pil, anns = _make_image(rng)
        file_name = f"{i:06d}.jpg"
        pil.save(os.path.join(img_dir, file_name), format="JPEG",
                 quality=_JPEG_QUALITY, subsampling=0, optimize=False)
        image_id = i + 1
        images.append(
            {"id": image_id, "file_name": file_name, "width": pil.size[0], "height": pil.size[1]}
        )
        for a in anns:
            a = dict(a, id=ann_id, image_id=image_id)
            annotations.append(a)
            ann_id += 1
    coco = {
        "info": {
            "description": f"randwire_d2 procedural demo dataset ({split})",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(DEMO_CLASSES)
        ],
    }
    with open(os.path.join(root, "annotations", f"{split}.json"), "w") as f:
        json.dump(coco, f, sort_keys=True)
    return coco


def _expected_marker(num_train: int, num_val: int, seed: int) -> Dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "seed": int(seed),
        "classes": list(DEMO_CLASSES),
    }


def generate_demo_dataset(
    root: str,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
) -> str:
    """Generate the demo dataset into ``root`` (replacing whatever is there).

    The data is built in a temporary sibling directory and moved into place
    with a rename, so ``root`` is either absent, the old content, or the
    complete new dataset. Returns ``root``.
    """
    root = os.path.abspath(os.path.expanduser(root))
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        _write_split(tmp, "train", num_train, seed)
        _write_split(tmp, "val", num_val, seed)
        # the marker is written last: its presence means "complete"
        with open(os.path.join(tmp, MARKER_FILE), "w") as f:
            json.dump(_expected_marker(num_train, num_val, seed), f, indent=2, sort_keys=True)
        if is_valid_demo_dataset(root, num_train, num_val, seed):
            # another process (e.g. a DDP worker) finished the same data first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        if os.path.lexists(root):
            # move the old directory aside first (rename is atomic), then delete it
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=parent)
            os.replace(root, os.path.join(trash, "old"))
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            # another process finished first; keep theirs if it is valid
            if not is_valid_demo_dataset(root, num_train, num_val, seed):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def is_valid_demo_dataset(
    root: str,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
) -> bool:
    """True if ``root`` holds a complete dataset from this generator version
    with these parameters (marker matches, json files parse, images exist)."""
    try:
        with open(os.path.join(root, MARKER_FILE)) as f:
            marker = json.load(f)
        if marker != _expected_marker(num_train, num_val, seed):
            return False
        for split, n in (("train", num_train), ("val", num_val)):
            with open(os.path.join(root, "annotations", f"{split}.json")) as f:
                coco = json.load(f)
            if len(coco["images"]) != n:
                return False
            for im in coco["images"]:
                p = os.path.join(root, split, im["file_name"])
                if not os.path.isfile(p) or os.path.getsize(p) == 0:
                    return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def default_demo_root() -> str:
    """``$RANDWIRE_DEMO_ROOT`` or ``~/.cache/randwire_d2/demo_v1``."""
    root = os.environ.get("RANDWIRE_DEMO_ROOT")
    if not root:
        root = os.path.join("~", ".cache", "randwire_d2", f"demo_v{GENERATOR_VERSION}")
    return os.path.abspath(os.path.expanduser(root))


def ensure_demo_dataset(
    root: Optional[str] = None,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
) -> str:
    """Generate the dataset under ``root`` unless a valid one is there.

    Returns the absolute root.
    """
    root = os.path.abspath(os.path.expanduser(root)) if root else default_demo_root()
    if not is_valid_demo_dataset(root, num_train, num_val, seed):
        logger.info("Generating the randwire demo dataset in %s ...", root)
        generate_demo_dataset(root, num_train, num_val, seed)
    return root


# --------------------------------------------------------------------------
# detectron2 registration
# --------------------------------------------------------------------------
def _load_split(root: str, split: str, dataset_name: str, num_train: int, num_val: int, seed: int):
    from detectron2.data.datasets import load_coco_json

    ensure_demo_dataset(root, num_train=num_train, num_val=num_val, seed=seed)
    return load_coco_json(
        os.path.join(root, "annotations", f"{split}.json"),
        os.path.join(root, split),
        dataset_name,
    )


def register_demo_datasets(
    root: Optional[str] = None,
    names: Tuple[str, str] = DEMO_DATASET_NAMES,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
) -> Tuple[str, str]:
    """Register the demo train/val datasets in detectron2's catalogs.

    Lazy: nothing is generated until a dataset is loaded (or
    :func:`ensure_demo_dataset` is called). Calling this again with the same
    names is a no-op, so importing twice never raises. ``names`` and the
    size/seed arguments let tests register small copies under other names
    with their own ``root``.
    Returns the registered names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = os.path.abspath(os.path.expanduser(root)) if root else default_demo_root()
    registered = DatasetCatalog.list()
    for split, name in zip(("train", "val"), names):
        if name in registered:
            continue
        DatasetCatalog.register(
            name,
            lambda root=root, split=split, name=name: _load_split(
                root, split, name, num_train, num_val, seed
            ),
        )
        if name in MetadataCatalog.list():  # stale metadata from an earlier registration
            MetadataCatalog.remove(name)
        MetadataCatalog.get(name).set(
            thing_classes=list(DEMO_CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(DEMO_CLASSES))},
            json_file=os.path.join(root, "annotations", f"{split}.json"),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
            dataset_root=root,
            generated_on_demand=True,  # its files appear on first load: no pre-flight file check
        )
    return tuple(names)
