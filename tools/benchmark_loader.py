#!/usr/bin/env python
"""Images/s of the classification data loader (decode + augment), on CPU, no model.

    # a real ImageFolder tree (e.g. ImageNet's train/ folder):
    python tools/benchmark_loader.py --root /data/imagenet/train --workers 0 1 2 4 8
    # no data at hand: a temporary tree of real ImageNet photos (foolbox's samples,
    # re-encoded at ImageNet's typical 500x375, quality 90), replicated --num-images times:
    python tools/benchmark_loader.py --workers 0 1 2

It runs the exact training path (build_classification_train_loader with
ClassificationDatasetMapper, RandomResizedCrop 224 + flip) or, with --eval, the test
path (resize 256 + center crop 224), and also times the per-image stages in this
process (file read, JPEG decode, augment, to-tensor) to show what bounds the loader.
"""
import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_tree(dest: str, num_images: int, size) -> str:
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "No --root given and foolbox's sample photos are not installed "
            "(`pip install --no-deps foolbox==3.3.4`)."
        )
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    photos = sorted(os.path.join(data, n) for n in os.listdir(data) if n.startswith("imagenet_"))
    encoded = []
    for i, p in enumerate(photos):
        img = Image.open(p).convert("RGB")
        if size:
            img = img.resize(size, Image.BICUBIC)
        path = os.path.join(dest, f"_src_{i}.JPEG")
        img.save(path, quality=90)
        encoded.append(path)
    for i in range(num_images):
        cls_dir = os.path.join(dest, f"n{i % 10:08d}")
        os.makedirs(cls_dir, exist_ok=True)
        shutil.copy(encoded[i % len(encoded)], os.path.join(cls_dir, f"img_{i:07d}.JPEG"))
    for p in encoded:
        os.remove(p)
    return dest


def stage_breakdown(dicts, mapper, n: int):
    """Seconds per image of each stage, single-threaded, in this process."""
    import numpy as np
    import torch
    from PIL import Image

    t = {"read": 0.0, "decode": 0.0, "augment": 0.0, "to_tensor": 0.0}
    import io

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="ImageFolder tree (<root>/<class>/<image>); default: a temporary one")
    parser.add_argument("--num-images", type=int, default=2000, help="size of the temporary tree")
    parser.add_argument("--image-size", default="500x375", help="WxH of the temporary tree's JPEGs ('' keeps 512x512)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--eval", action="store_true", help="time the evaluation transform")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    import randwire_d2.data  # noqa: F401
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from randwire_d2.config import add_classification_config, add_randwire_config
    from randwire_d2.data.classification import (
        ClassificationDatasetMapper,
        build_classification_test_loader,
        build_classification_train_loader,
        register_image_folder,
    )

    tmp = None
    root = args.root
    if not root:
        tmp = tempfile.mkdtemp(prefix="rw_loader_bench_")
        size = tuple(int(v) for v in args.image_size.lower().split("x")) if args.image_size else None
        root = make_tree(tmp, args.num_images, size)
    try:
        name = "benchmark_loader_dataset"
        register_image_folder(name, root)
        t0 = time.perf_counter()
        dicts = DatasetCatalog.get(name)
        print(f"dataset: {root}: {len(dicts)} images, listed in {time.perf_counter() - t0:.2f}s")
        cfg = get_cfg()
        add_randwire_config(cfg)
        add_classification_config(cfg)
        cfg.DATASETS.TRAIN = (name,)
        cfg.SOLVER.IMS_PER_BATCH = args.batch_size
        cfg.TEST.IMS_PER_BATCH = args.batch_size
        mapper = ClassificationDatasetMapper(cfg, not args.eval)
        per = stage_breakdown(dicts, mapper, min(200, len(dicts)))
        total = sum(per.values())
        print(
            "per image, 1 core: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in per.items())
            + f" -> {1 / total:.0f} img/s/core"
        )
        print(f"cpu cores available: {len(os.sched_getaffinity(0))}")
        for workers in args.workers:
            cfg.DATALOADER.NUM_WORKERS = workers
            if args.eval:
                loader = build_classification_test_loader(cfg, name)
            else:
                loader = build_classification_train_loader(cfg)
            it = iter(loader)
            n = 0
            for _ in range(2):  # warm-up: worker start-up, first prefetch
                next(it)
            t0 = time.perf_counter()
            for _ in range(args.batches):
                try:
                    batch = next(it)
                except StopIteration:  # the eval loader is finite
                    it = iter(loader)
                    batch = next(it)
                n += len(batch)
            dt = time.perf_counter() - t0
            print(f"workers={workers:2d} batch={args.batch_size}: {n / dt:7.0f} img/s  ({dt / args.batches * 1e3:.0f} ms/batch)")
            del it, loader
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
