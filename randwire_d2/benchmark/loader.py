"""Images/s of the classification data loader (decode + augment), no model, both paths.

:func:`foolbox_photo_tree` builds a temporary ImageFolder tree of real ImageNet photos
(foolbox's samples, re-encoded as JPEG); :func:`stage_breakdown` times the per-image stages
of the CPU path in this process, :func:`encode_rate` the device path's worker half (read the
bytes, parse the header, draw the crop plan), :func:`device_decode_rate` its main-process
half (batched decode + crop/resize/flip on the device); :func:`loader_throughput` times
the real loader; :func:`loader_report` does all of it for a tree and returns one dict.
"""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["device_decode_rate", "encode_rate", "foolbox_photos", "foolbox_photo_tree", "loader_report",
           "loader_throughput", "stage_breakdown"]


def foolbox_photos() -> List[str]:
    """Paths of the 20 ImageNet validation JPEGs shipped in the foolbox package (read as files)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "foolbox's sample photos are not installed (`pip install --no-deps foolbox==3.3.4`); "
            "give an ImageFolder tree instead (--root)."
        )
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return sorted(os.path.join(data, n) for n in os.listdir(data) if n.startswith("imagenet_"))


def foolbox_photo_tree(dest: str, num_images: int, size: Optional[Tuple[int, int]] = (500, 375),
                       classes: int = 10, quality: int = 90) -> str:
    """``dest/n<class>/img_<i>.JPEG``: foolbox's photos resized to ``size`` (W, H; None keeps
    them) and JPEG-encoded at ``quality``, replicated to ``num_images`` files."""
    from PIL import Image

    encoded = []
    for i, p in enumerate(foolbox_photos()):
        img = Image.open(p).convert("RGB")
        if size:
            img = img.resize(tuple(size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        encoded.append(buf.getvalue())
    for i in range(num_images):
        cls_dir = os.path.join(dest, f"n{i % classes:08d}")
        os.makedirs(cls_dir, exist_ok=True)
        with open(os.path.join(cls_dir, f"img_{i:07d}.JPEG"), "wb") as f:
            f.write(encoded[i % len(encoded)])
    return dest


def stage_breakdown(dicts: Sequence[Dict], mapper, n: int) -> Dict[str, float]:
    """Seconds per image of each stage of the CPU path, single-threaded, in this process."""
    import numpy as np
    import torch
    from PIL import Image

    t = {"read": 0.0, "decode": 0.0, "augment": 0.0, "to_tensor": 0.0}
    for d in dicts[:n]:
        t0 = time.perf_counter()
        with open(d["file_name"], "rb") as f:
            raw = f.read()
        t1 = time.perf_counter()
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        t2 = time.perf_counter()
        arr = mapper.transform(img)
        t3 = time.perf_counter()
        torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        t4 = time.perf_counter()
        t["read"] += t1 - t0
        t["decode"] += t2 - t1
        t["augment"] += t3 - t2
        t["to_tensor"] += t4 - t3
    return {k: v / n for k, v in t.items()}


def loader_throughput(cfg, name: str, *, workers: int, batches: int, is_train: bool = True,
                      warmup: int = 2) -> Dict:
    """{"workers", "img_s", "ms_per_batch"} of the loader ``cfg`` builds for dataset ``name``."""
    import torch

    from ..data.classification import build_classification_test_loader, build_classification_train_loader

    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = workers
    loader = build_classification_train_loader(cfg) if is_train else build_classification_test_loader(cfg, name)
    it = iter(loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:  # the eval loader is finite
            it = iter(loader)
            return next(it)

    def wait(batch):  # the device path's last batch may still be decoding on the GPU
        images = getattr(batch, "images", None)
        if images is not None and images.is_cuda:
            torch.cuda.synchronize(images.device)

    for _ in range(warmup):  # worker start-up, first prefetch
        wait(next_batch())
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next_batch()
        n += len(batch)
    wait(batch)
    dt = time.perf_counter() - t0
    del it, loader
    return {"workers": workers, "img_s": n / dt, "ms_per_batch": dt / batches * 1e3}


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def encode_rate(dicts: Sequence[Dict], mapper, n: int) -> float:
    """Images/s of one core doing the device path's worker half (``mapper.decode_device`` set)."""
    from ..data.resumable import seeded_rngs

    t0 = time.perf_counter()
    for i, d in enumerate(dicts[:n]):
        with seeded_rngs(i):
            mapper(dict(d))
    return n / (time.perf_counter() - t0)


def device_decode_rate(dicts: Sequence[Dict], mapper, *, batch_size: int, batches: int, warmup: int = 1) -> float:
    """Images/s of the device path's main-process half: batched decode and augmentation on
    ``mapper.decode_device`` (synchronised on CUDA), batches encoded beforehand."""
    import torch

    from ..data.device_decode import DeviceDecoder, encoded_collator
    from ..data.resumable import seeded_rngs

    decoder = DeviceDecoder(mapper.decode_device, mapper.crop_size, mapper.image_format)
    encoded = []
    for b in range(min(batches, 4)):  # a few distinct batches, reused
        items = []
        for i in range(batch_size):
            with seeded_rngs(b * batch_size + i):
                items.append(mapper(dict(dicts[(b * batch_size + i) % len(dicts)])))
        encoded.append(encoded_collator(items))
    cuda = decoder.device.type == "cuda"
    if cuda:
        encoded = [e.pin_memory() for e in encoded]
    for i in range(warmup):
        decoder(encoded[i % len(encoded)])
    if cuda:
        torch.cuda.synchronize(decoder.device)
    t0 = time.perf_counter()
    for i in range(batches):
        decoder(encoded[i % len(encoded)])
    if cuda:
        torch.cuda.synchronize(decoder.device)
    return batches * batch_size / (time.perf_counter() - t0)


def loader_report(cfg, name: str, *, device: str, workers: Sequence[int], batches: int, is_train: bool = True,
                  paths: Sequence[str] = ("cpu", "device"), log=print) -> Dict:
    """Per-core and loader images/s of each decode path on dataset ``name`` (cfg: its loader)."""
    from detectron2.data import DatasetCatalog

    from ..data.classification import ClassificationDatasetMapper

    dicts = DatasetCatalog.get(name)
    n = min(200, len(dicts))
    out = {"images": len(dicts), "batch_size": cfg.SOLVER.IMS_PER_BATCH, "is_train": is_train,
           "cpu_cores": len(os.sched_getaffinity(0)), "paths": {}}
    for path in paths:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = device if path == "device" else cfg.MODEL.DEVICE
        cfg.INPUT.CLS_DECODE = path
        mapper = ClassificationDatasetMapper(cfg, is_train)
        row: Dict = {"decode_device": mapper.decode_device}
        if path == "cpu":
            per = stage_breakdown(dicts, mapper, n)
            row["stage_ms"] = {k: round(v * 1e3, 3) for k, v in per.items()}
            row["worker_img_s_per_core"] = round(1 / sum(per.values()), 1)
        else:
            row["worker_img_s_per_core"] = round(encode_rate(dicts, mapper, n), 1)
            row["device_img_s"] = round(device_decode_rate(dicts, mapper, batch_size=cfg.SOLVER.IMS_PER_BATCH,
                                                           batches=batches), 1)
        row["loader"] = []
        for w in workers:
            r = loader_throughput(cfg, name, workers=w, batches=batches, is_train=is_train)
            row["loader"].append({k: round(v, 1) for k, v in r.items()})
        log(f"{path:6s} path: {row}")
        out["paths"][path] = row
    return out
