#!/usr/bin/env python
"""Speed and memory of RandWire against ResNet-50, in one process and one run.

    python tools/benchmark.py --device cuda --json benchmarks/h100-2026-11-24.json
    python tools/benchmark.py --tiny --device cpu --json /tmp/bench.json     # CI size, < 60 s
    python tools/benchmark.py --cost-only --presets regular-c109 --json benchmarks/cost.json
    python tools/benchmark.py --detection-cost --json benchmarks/detection-cost.json   # FPN step cost
    python tools/benchmark.py --executor-timing --json benchmarks/executors-cpu.json  # EXECUTOR auto's CPU choice
    python tools/benchmark.py --suite gpu              # the one-call GPU proof (benchmarks/README.md)
    python tools/benchmark.py --suite gpu --device cpu --smoke --json /tmp/suite.json  # CI, ~35 s

The measurements are ``randwire_d2.benchmark`` (``gpu_suite``, ``detection_cost``: see their
docstrings); this script parses arguments and calls them.

Cost model (``randwire_d2.cost``, any device, no timing): activations kept for backward,
bytes moved by a training step per image (and by its forward + backward alone) and ATen ops
(kernel launches) per step, for every RandWire row and ResNet-50, and their ratios -- the
device-independent measures to steer by when no GPU is at hand. RandWire classifiers train
with ``--drop-path`` (0.1, the ImageNet recipe's).

What it times
  (a) classification: a training step (forward, label-smoothing-free cross entropy, backward,
      SGD momentum step) and an inference forward, for the RandWire presets (small C=78,
      regular C=109, regular C=154; WS(4, 0.75), N=32) under each ``--executors``, and
      torchvision's ResNet-50; ``--batch`` images of ``--image-size`` px.
  (b) detection: Faster R-CNN FPN training iteration (losses, backward, SGD step) on
      ``--det-batch`` images of ``--det-size`` px and inference ms/image (batch 1, with
      post-processing) for RandWire-FPN (configs/randwire_frcnn.yaml, MODEL.WEIGHTS "",
      NORM BN) and detectron2's R50-FPN (model zoo
      COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml, MODEL.WEIGHTS ""). Both keep their
      config's FREEZE_AT (2: stem and res2 frozen).
  Every figure for each precision of ``--precisions``: fp32 (no autocast), bf16 and fp16
  (torch.autocast; fp16 training uses a GradScaler). On CPU fp16 is recorded as
  ``status: "unsupported"``.

Method: ``--warmup`` untimed iterations, then ``--repeats`` iterations each timed alone
(torch.cuda.synchronize before and after on GPU); figures are medians, raw times are kept.
Peak memory: on GPU torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
the memory allocated before the timed loop (model, optimizer state, inputs excluded);
on CPU the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
over the RSS before the loop (after glibc malloc_trim), or null where the kernel does not
allow the reset. CPU figures are approximate (allocator caching, page granularity).
Work per step (one extra, untimed iteration, so the reader can compute the fraction of
the device's peak): ``*_gflop`` from torch.utils.flop_counter (2 FLOPs per multiply-add,
backward included for training) and ``*_gbytes``, the sum of the sizes of every tensor
read and written by every ATen op (a TorchDispatchMode counter: views are free, each
kernel's operands count once -- an upper bound on DRAM traffic, as caches are ignored).
``*_achieved_gbs`` / ``*_achieved_tflops`` divide them by the median time.
For classification the forward FLOPs per image from fvcore (1 FLOP per multiply-add,
the convention of the papers' "4.0 GFLOPs") are also reported as ``fvcore_gflops_per_image``.

JSON fields (``--json PATH``)
  schema                 1
  date                   ISO time of the run (local); ``--date`` overrides it
  command                the exact command line (shell-quoted)
  device                 {type: cpu|cuda, name, threads, capability (cuda)}
  versions               {python, torch, torchvision, detectron2, fvcore}
  settings               {tiny, batch, image_size, det_batch, det_size, warmup, repeats,
                          precisions, executors, channels_last, compile, cost_batch, cost_only,
                          drop_path, tf32_matmul, tf32_cudnn}
  classification         list, one row per (model, executor, precision):
      model ("randwire-<preset>" | "resnet50"), preset, regime, channels, nodes, executor
      (null for ResNet-50), precision, status ("ok" | "unsupported" | "error: ..."),
      params_m, fvcore_gflops_per_image,
      train_ms, train_img_s, train_times_ms, train_peak_mem_mb,
      infer_ms, infer_img_s, infer_times_ms, infer_peak_mem_mb,
      train_gflop, train_gbytes, train_achieved_tflops, train_achieved_gbs,
      infer_gflop, infer_gbytes, infer_achieved_tflops, infer_achieved_gbs, compiled,
      saved_mb_per_img, traffic_mb_per_img, traffic_fwd_bwd_mb_per_img, ops_per_step
      (randwire_d2.cost at --cost-batch images, fp32, eager: activations kept for backward,
      bytes moved by a training step, and ATen ops of its forward + backward;
      device-independent, the same for every precision row)
  detection              list, one row per (model, executor, precision):
      model ("randwire-fpn" | "r50-fpn"), executor, precision, status, params_m,
      train_ms_iter, train_times_ms, train_peak_mem_mb, infer_ms_image, infer_times_ms,
      infer_peak_mem_mb, train_gflop, train_gbytes, train_achieved_tflops,
      train_achieved_gbs, infer_gflop, infer_gbytes, infer_achieved_tflops, infer_achieved_gbs
  memory_kind            "cuda_max_memory_allocated" | "cpu_peak_rss_delta" | null
  ratios                 list of {what, executor, precision, randwire, baseline, ratio}:
                         classification training img/s of regular C=109 / ResNet-50, the
                         cost fields of every RandWire row / ResNet-50's,
                         detection train ms/iter and train peak memory RandWire-FPN / R50-FPN
"""
import argparse
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from randwire_d2.benchmark import PRESETS, Settings, run_benchmark  # noqa: E402
from randwire_d2.benchmark.measure import DTYPES  # noqa: E402


def _csv(text):
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="RandWire vs ResNet-50 speed/memory benchmark (see module docstring).")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="CI size: batch 2, 64 px, C=16, N=10; detection 1 image 128 px")
    ap.add_argument("--batch", type=int, default=None, help="classification batch (256 cuda, 8 cpu, 2 tiny)")
    ap.add_argument("--image-size", type=int, default=None, help="classification px (224; 64 tiny)")
    ap.add_argument("--det-batch", type=int, default=None, help="detection training images (8 cuda, 1 cpu/tiny)")
    ap.add_argument("--det-size", type=str, default=None, help="detection H,W (800,1216 cuda; 512,768 cpu; 128,128 tiny)")
    ap.add_argument("--precisions", default="fp32,bf16,fp16", help=f"of {list(DTYPES)}")
    ap.add_argument("--executors", default="lean,lean+recompute,reference",
                    help="RandWire stage executors to time (lean+recompute: lean with RECOMPUTE)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the RandWire networks (as MODEL.RANDWIRE.COMPILE does)")
    ap.add_argument("--cost-only", action="store_true",
                    help="only the device-independent cost model (classification; no timing, no detection)")
    ap.add_argument("--cost-batch", type=int, default=4,
                    help="batch of the device-independent cost model (randwire_d2.cost; 0: skip)")
    ap.add_argument("--suite", choices=["gpu"], default=None,
                    help="gpu: the one-call GPU proof (randwire_d2.benchmark.gpu_suite; <= 8 min on one "
                         "H100/H200), JSON rewritten after every section")
    ap.add_argument("--smoke", action="store_true", help="--suite at tiny sizes (CI: --device cpu)")
    ap.add_argument("--detection-cost", action="store_true",
                    help="only the cost model of a Faster R-CNN FPN training step, RandWire-FPN vs R50-FPN "
                         "(--det-batch images of --det-size; default 2 x 800,1216; CPU, fp32)")
    ap.add_argument("--executor-timing", action="store_true",
                    help="only the demo config's CPU training step per executor, s/it (what EXECUTOR auto "
                         "picks on a CPU; --executors, --repeats rounds, --det-config another yaml)")
    ap.add_argument("--det-config", default=None,
                    help="RandWire-FPN yaml of --detection-cost (default configs/randwire_frcnn.yaml)")
    ap.add_argument("--no-regions", dest="regions", action="store_false",
                    help="--detection-cost without the bottom-up / FPN / heads split (3x faster)")
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"of {list(PRESETS)} (ignored with --tiny)")
    ap.add_argument("--drop-path", type=float, default=0.1,
                    help="DropPath rate of the RandWire classifiers (0.1: the ImageNet recipe's)")
    ap.add_argument("--channels-last", action="store_true", help="models and inputs in NHWC")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (5; 1 tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed iterations, median reported (20; 3 tiny)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: 1 with --tiny on CPU, else torch's default)")
    ap.add_argument("--skip-classification", action="store_true")
    ap.add_argument("--skip-detection", action="store_true")
    ap.add_argument("--no-count-work", dest="count_work", action="store_false",
                    help="skip the extra FLOP/byte-counting iteration")
    ap.add_argument("--date", default=None, help="date recorded in the JSON (default: now)")
    ap.add_argument("--json", default=None, help="write all figures here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    settings = Settings(
        device=args.device, tiny=args.tiny, batch=args.batch, image_size=args.image_size,
        det_batch=args.det_batch, det_size=args.det_size and _csv(args.det_size),
        precisions=_csv(args.precisions), executors=_csv(args.executors), presets=_csv(args.presets),
        channels_last=args.channels_last, compile=args.compile, cost_only=args.cost_only,
        cost_batch=args.cost_batch, drop_path=args.drop_path, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
        skip_classification=args.skip_classification, skip_detection=args.skip_detection,
        count_work=args.count_work,
    )
    try:
        settings.resolve()
    except ValueError as exc:
        ap.error(str(exc))
    return args, settings


def main(argv=None):
    args, settings = parse_args(argv)
    command = shlex.join([sys.executable] + (sys.argv if argv is None else ["tools/benchmark.py", *argv]))
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.suite == "gpu":
        import datetime

        from randwire_d2.benchmark.gpu_suite import run_gpu_suite

        default = f"benchmarks/gpu-suite-{args.device}{'-smoke' if args.smoke else ''}-{datetime.date.today()}.json"
        return run_gpu_suite(device=args.device, smoke=args.smoke, json_path=args.json or default,
                             command=command, log=log)
    if args.executor_timing:
        from randwire_d2.benchmark.executors import DEMO_CONFIG, time_executors

        return time_executors(args.det_config or DEMO_CONFIG, executors=tuple(_csv(args.executors)),
                              rounds=args.repeats or 3, threads=settings.threads, json_path=args.json,
                              command=command, date=args.date, log=log)
    if args.detection_cost:
        from randwire_d2.benchmark.detection_cost import run_detection_cost

        if settings.threads:
            torch.set_num_threads(settings.threads)
        return run_detection_cost(
            command=command, images=args.det_batch or 2, size=settings.det_size if args.det_size else (800, 1216),
            tiny=settings.tiny, regions=args.regions, randwire_config=args.det_config, date=args.date,
            json_path=args.json, log=log)
    return run_benchmark(settings, command=command, date=args.date, json_path=args.json, log=log)


if __name__ == "__main__":
    main()
