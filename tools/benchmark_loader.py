#!/usr/bin/env python
"""Images/s of the classification data loader (decode + augment), no model.

    # a real ImageFolder tree (e.g. ImageNet's train/ folder):
    python tools/benchmark_loader.py --root /data/imagenet/train --workers 0 1 2 4 8
    # no data at hand: a temporary tree of real ImageNet photos (foolbox's samples,
    # re-encoded at ImageNet's typical 500x375, quality 90), replicated --num-images times:
    python tools/benchmark_loader.py --workers 0 1 2

It runs the exact training path (build_classification_train_loader with
ClassificationDatasetMapper, RandomResizedCrop 224 + flip) or, with --eval, the test
path (resize 256 + center crop 224), and also times the per-image stages in this
process (file read, JPEG decode, augment, to-tensor) to show what bounds the loader.
The measurements are randwire_d2.benchmark.loader.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    from randwire_d2.benchmark import loader as bench
    from randwire_d2.config import add_classification_config, add_randwire_config
    from randwire_d2.data.classification import ClassificationDatasetMapper, register_image_folder

    tmp = None
    root = args.root
    if not root:
        tmp = tempfile.mkdtemp(prefix="rw_loader_bench_")
        size = tuple(int(v) for v in args.image_size.lower().split("x")) if args.image_size else None
        try:
            root = bench.foolbox_photo_tree(tmp, args.num_images, size)
        except FileNotFoundError as exc:
            bench.remove_tree(tmp)
            raise SystemExit(f"No --root given and {exc}")
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
        per = bench.stage_breakdown(dicts, mapper, min(200, len(dicts)))
        total = sum(per.values())
        print(
            "per image, 1 core: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in per.items())
            + f" -> {1 / total:.0f} img/s/core"
        )
        print(f"cpu cores available: {len(os.sched_getaffinity(0))}")
        for workers in args.workers:
            r = bench.loader_throughput(cfg, name, workers=workers, batches=args.batches, is_train=not args.eval)
            print(f"workers={workers:2d} batch={args.batch_size}: {r['img_s']:7.0f} img/s  "
                  f"({r['ms_per_batch']:.0f} ms/batch)")
    finally:
        if tmp:
            bench.remove_tree(tmp)


if __name__ == "__main__":
    main()
