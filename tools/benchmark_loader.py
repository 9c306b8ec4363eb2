#!/usr/bin/env python
"""Images/s of the classification data loader (decode + augment), no model, for both decode paths.

    # a real ImageFolder tree (e.g. ImageNet's train/ folder):
    python tools/benchmark_loader.py --root /data/imagenet/train --workers 0 1 2 4 8
    # no data at hand: a temporary tree of real ImageNet photos (foolbox's samples,
    # re-encoded at ImageNet's typical 500x375, quality 90), replicated --num-images times:
    python tools/benchmark_loader.py --workers 0 1 2

Paths (INPUT.CLS_DECODE): "cpu" -- PIL decodes and augments in the loader workers; "device"
-- workers read the bytes and draw the crop, the main process decodes the batch and augments
on --device (CUDA when available). For each it reports images/s per CPU core of the worker
half (size a node: cores per GPU = target img/s / this), for "device" the images/s of the
on-device half, and the real loader's images/s at each --workers. It runs the exact training
path (RandomResizedCrop 224 + flip) or, with --eval, the test path (resize 256 + center crop
224). The measurements are randwire_d2.benchmark.loader.
"""
import argparse
import os
import sys
import tempfile

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
    parser.add_argument("--paths", nargs="+", default=["cpu", "device"], choices=["cpu", "device"])
    parser.add_argument("--device", default=None, help="device of the 'device' path (default: cuda if available)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    import randwire_d2.data  # noqa: F401
    from detectron2.config import get_cfg
    from randwire_d2.benchmark import loader as bench
    from randwire_d2.benchmark.report import write_json
    from randwire_d2.config import add_classification_config, add_randwire_config
    from randwire_d2.data.classification import register_image_folder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
        cfg = get_cfg()
        add_randwire_config(cfg)
        add_classification_config(cfg)
        cfg.DATASETS.TRAIN = (name,)
        cfg.SOLVER.IMS_PER_BATCH = args.batch_size
        cfg.TEST.IMS_PER_BATCH = args.batch_size
        print(f"dataset: {root}; device path on {device}")
        report = bench.loader_report(cfg, name, device=device, workers=args.workers, batches=args.batches,
                                     is_train=not args.eval, paths=args.paths, log=lambda *_: None)
        print(f"cpu cores available: {report['cpu_cores']}")
        for path, row in report["paths"].items():
            extra = f", on-device half {row['device_img_s']:.0f} img/s" if "device_img_s" in row else ""
            print(f"{path:6s}: {row['worker_img_s_per_core']:.0f} img/s per worker core{extra}")
            for r in row["loader"]:
                print(f"        workers={r['workers']:2d} batch={args.batch_size}: {r['img_s']:7.0f} img/s "
                      f"({r['ms_per_batch']:.0f} ms/batch)")
        if args.json:
            write_json(dict(report, command=" ".join([sys.executable] + sys.argv), device=device), args.json)
    finally:
        if tmp:
            bench.remove_tree(tmp)


if __name__ == "__main__":
    main()
