"""Decode and augment classification images on the training device, in batches.

The CPU path (``INPUT.CLS_DECODE "cpu"``) decodes JPEGs with PIL and crops/resizes in the
loader workers: about 200 images/s per core, so feeding one fast GPU takes more cores than
a GPU host has. The device path moves the pixel work to the GPU:

* workers read each file's bytes and its header (size, JPEG or not) and draw the image's
  augmentation -- its :data:`CropPlan` -- from the same per-image-seeded RNG, in the same
  order, as the CPU path (so both paths crop the same boxes and flip the same images, and a
  resumed run sees the same batches whichever path it uses);
* a batch travels as one uint8 byte buffer plus the plans and one label tensor
  (:class:`EncodedBatch`, pinned once by the loader when CUDA is used);
* the main process decodes the batch's JPEGs together (``torchvision.io.decode_jpeg`` with
  a list and ``device=``: nvJPEG on CUDA, libjpeg-turbo on CPU), then crops, resizes
  (bilinear, antialiased like PIL), pads and flips each image on the device into one uint8
  ``(N, 3, S, S)`` tensor (:class:`ImageBatch`); the model normalises it on the device.

Files that are not RGB/gray JPEGs (PNG, CMYK JPEG, ...) and in-memory arrays are decoded in
the worker with PIL, exactly as on the CPU path, and travel as pixels. The same code runs
with ``device="cpu"`` (the tests do): decoding is bit-identical to PIL's, resizing within one
grey level of it.

Why not NVIDIA DALI: its pipelines draw augmentation from their own RNG (no exact resume,
no bit-for-bit agreement with the CPU path), it cannot run the same code on a CPU-only CI
machine, and it is one more CUDA-version-specific wheel. Its edge -- the A100/H100 hardware
JPEG decoder and ROI decoding -- matters only if the GPU suite's ``loader`` section shows
this path short of the training step's rate.
"""
from __future__ import annotations

import collections.abc
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

__all__ = [
    "DECODE_CHOICES", "DecodedLoader", "DeviceDecoder", "EncodedBatch", "ImageBatch", "apply_plan",
    "encoded_collator", "resolve_decode_device",
]

logger = logging.getLogger(__name__)

DECODE_CHOICES = ("auto", "cpu", "device")

# (left, top, right, bottom) of the source region, the (width, height) it is resized to, the
# (x, y) of the CROP_SIZE window in the resized region, the (dx, dy) shift of that window
# with zeros outside (pad_crop), and the flip (0 none, 1 horizontal, 2 vertical).
CropPlan = Tuple[int, int, int, int, int, int, int, int, int, int, int]
FLIPS = {"none": 0, "horizontal": 1, "vertical": 2}


def resolve_decode_device(setting: str, model_device: str) -> Optional[str]:
    """INPUT.CLS_DECODE -> the device that decodes (None: PIL in the loader workers).

    "auto": the model's device when it is a CUDA device and CUDA is available, else the CPU
    path; "cpu": the CPU path; "device": MODEL.DEVICE decodes (also "cpu", to test the path).
    """
    if setting not in DECODE_CHOICES:
        raise ValueError(
            f"INPUT.CLS_DECODE = {setting!r} is invalid: 'auto' (decode on the GPU when MODEL.DEVICE is CUDA), "
            "'cpu' (PIL in the loader workers) or 'device' (batched on MODEL.DEVICE)."
        )
    is_cuda = str(model_device).startswith("cuda")
    if setting == "cpu" or (setting == "auto" and not (is_cuda and torch.cuda.is_available())):
        return None
    if is_cuda and not torch.cuda.is_available():
        raise ValueError(
            f"INPUT.CLS_DECODE = 'device' with MODEL.DEVICE = {model_device!r}, but CUDA is not available: "
            "use INPUT.CLS_DECODE 'auto' or 'cpu'."
        )
    return str(model_device)


# --------------------------------------------------------------------------- batches
class ImageBatch(collections.abc.Sequence):
    """detectron2's batch (a sequence of dicts) that also holds its images stacked into one
    uint8 ``(N, C, H, W)`` tensor and its labels as one int64 tensor; each dict's "image"
    views a row. The loader pins it as one block, the model copies it with one
    ``non_blocking`` copy. Not a ``list`` on purpose: DistributedDataParallel would move a
    list's tensors one by one and hand the model a plain list."""

    def __init__(self, dicts: Sequence[Dict], images: torch.Tensor, labels: torch.Tensor):
        self._dicts = list(dicts)
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self._dicts)

    def __getitem__(self, index):
        return self._dicts[index]

    def __repr__(self):
        return f"ImageBatch({len(self)} images {tuple(self.images.shape)} on {self.images.device})"

    @classmethod
    def stack(cls, dicts: Sequence[Dict]) -> "ImageBatch":
        images = torch.stack([d["image"] for d in dicts])
        labels = torch.as_tensor([int(d["label"]) for d in dicts], dtype=torch.int64)
        return cls._viewing(dicts, images, labels)

    @classmethod
    def _viewing(cls, dicts, images, labels):
        out = []
        for i, d in enumerate(dicts):
            d = dict(d)
            d["image"] = images[i]
            out.append(d)
        return cls(out, images, labels)

    def pin_memory(self, device=None):  # called by the DataLoader's pin-memory thread
        return self._viewing(self, self.images.pin_memory(), self.labels.pin_memory())


class EncodedBatch:
    """What workers hand over on the device path: one uint8 buffer with the batch's JPEG
    bytes (``spans[i]`` = (start, end), or None for an image sent as ``pixels[i]``, CHW
    uint8), the crop plans, the labels and the dicts (without pixels)."""

    def __init__(self, data, spans, pixels, plans, labels, dicts):
        self.data, self.spans, self.pixels = data, spans, pixels
        self.plans, self.labels, self.dicts = plans, labels, dicts

    def __len__(self):
        return len(self.dicts)

    def pin_memory(self, device=None):
        pixels = {i: p.pin_memory() for i, p in self.pixels.items()}
        return EncodedBatch(self.data.pin_memory(), self.spans, pixels, self.plans, self.labels.pin_memory(),
                            self.dicts)


def encoded_collator(batch: List[Dict]) -> EncodedBatch:
    """Collate the device path's mapped dicts ("encoded" bytes or "pixels", "crop_plan")."""
    chunks, spans, pixels, dicts, start = [], [], {}, [], 0
    for i, d in enumerate(batch):
        d = dict(d)
        encoded, image = d.pop("encoded", None), d.pop("pixels", None)
        if encoded is not None:
            chunks.append(encoded)
            spans.append((start, start + encoded.numel()))
            start += encoded.numel()
        else:
            spans.append(None)
            pixels[i] = image
        dicts.append(d)
    data = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    plans = torch.tensor([d.pop("crop_plan") for d in dicts], dtype=torch.int64).reshape(len(dicts), -1)
    labels = torch.as_tensor([int(d["label"]) for d in dicts], dtype=torch.int64)
    return EncodedBatch(data, spans, pixels, plans, labels, dicts)


# --------------------------------------------------------------------------- transforms
def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 CHW -> float CHW (not rounded), bilinear with PIL's antialiasing when shrinking."""
    return F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.round_().clamp_(0, 255).to(torch.uint8)


def apply_plan(image: torch.Tensor, plan: Sequence[int], size: int, *, rounded: bool = True) -> torch.Tensor:
    """The ``size`` x ``size`` crop a :data:`CropPlan` describes, of a uint8 CHW ``image``
    (uint8; with ``rounded=False`` resized crops stay float, for the caller to round in one go)."""
    left, top, right, bottom, rw, rh, cx, cy, dx, dy, flip = (int(v) for v in plan)
    x = image[:, top:bottom, left:right]
    if (rh, rw) != tuple(x.shape[1:]):
        x = _resize(x, rh, rw)
    x = x[:, cy : cy + size, cx : cx + size]
    if dx or dy:  # output (i, j) = window (i + dy, j + dx), zero outside
        shifted = torch.zeros_like(x)
        h, w = x.shape[1:]
        shifted[:, max(0, -dy) : min(h, h - dy), max(0, -dx) : min(w, w - dx)] = \
            x[:, max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)]
        x = shifted
    if flip == 1:
        x = x.flip(2)
    elif flip == 2:
        x = x.flip(1)
    return _to_uint8(x) if rounded else x


class DeviceDecoder:
    """:class:`EncodedBatch` -> :class:`ImageBatch` on ``device``, in the main process."""

    def __init__(self, device: str, crop_size: int, image_format: str = "RGB"):
        self.device_name, self.crop_size, self.image_format = str(device), int(crop_size), image_format
        self._device = None

    @property
    def device(self) -> torch.device:
        if self._device is None:  # resolved in the process that decodes (its current GPU)
            dev = torch.device(self.device_name)
            if dev.type == "cuda" and dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            self._device = dev
        return self._device

    def _decode_jpegs(self, batch: EncodedBatch) -> Dict[int, torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        idx = [i for i, s in enumerate(batch.spans) if s is not None]
        if not idx:
            return {}
        datas = [batch.data[batch.spans[i][0] : batch.spans[i][1]] for i in idx]
        try:
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # find the file that failed, then decode the rest one by one
            images = []
            for i, data in zip(idx, datas):
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as exc:
                    name = batch.dicts[i].get("file_name", f"image_id {batch.dicts[i].get('image_id')}")
                    why = str(exc).strip().splitlines()[-1].split(", ")[-1]  # the message, not the C++ location
                    raise ValueError(f"Cannot decode JPEG {name!r} on {self.device}: {why}") from exc
        return dict(zip(idx, images))

    def __call__(self, batch: EncodedBatch) -> ImageBatch:
        dev, size = self.device, self.crop_size
        decoded = self._decode_jpegs(batch)
        # resized crops land in one float batch, rounded to uint8 once (fewer kernels per image)
        images = torch.empty((len(batch), 3, size, size), dtype=torch.float32, device=dev)
        plans = batch.plans.tolist()
        for i in range(len(batch)):
            image = decoded[i] if i in decoded else batch.pixels[i].to(dev, non_blocking=True)
            images[i] = apply_plan(image, plans[i], size, rounded=False)
        images = _to_uint8(images)
        if self.image_format == "BGR":
            images = images.flip(1)
        labels = batch.labels.to(dev, non_blocking=True)
        dicts = [dict(d, height=size, width=size) for d in batch.dicts]
        return ImageBatch._viewing(dicts, images, labels)


class DecodedLoader:
    """A loader whose batches pass through ``transform`` in the iterating process."""

    def __init__(self, loader, transform):
        self.loader, self.transform = loader, transform

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.transform(batch)
