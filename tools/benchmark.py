#!/usr/bin/env python
"""Speed and memory of RandWire against ResNet-50, in one process and one run.

    python tools/benchmark.py --device cuda --json benchmarks/h100-2026-11-24.json
    python tools/benchmark.py --tiny --device cpu --json /tmp/bench.json     # CI size, < 60 s
    python tools/benchmark.py --cost-only --presets regular-c109 --json benchmarks/cost.json

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
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS = {  # name: (regime, C, N)
    "small-c78": ("small", 78, 32),
    "regular-c109": ("regular", 109, 32),
    "regular-c154": ("regular", 154, 32),
}
TINY_PRESETS = {"tiny-c16": ("regular", 16, 10)}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------ utils
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, precision):
    dtype = DTYPES[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _unsupported(device, precision):
    if precision not in DTYPES:
        return f"unknown precision {precision!r}"
    if device.type == "cpu" and precision == "fp16":
        return "unsupported"
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "unsupported"
    return None


def _rss_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block above what was in use when it started, in MB (or None)."""

    def __init__(self, device):
        self.device = device
        self.mb = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = None
            _malloc_trim()  # hand freed heap back to the OS, so RSS starts at what is live
            try:  # "5" resets VmHWM (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base = _rss_kb("VmRSS")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.base is not None:
            peak = _rss_kb("VmHWM")
            self.mb = None if peak is None else max(0, peak - self.base) / 1024
        return False


def memory_kind(device):
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    with PeakMemory(device) as pm:
        pass
    return "cpu_peak_rss_delta" if pm.mb is not None else None


def timed(fn, device, warmup, repeats):
    """Median seconds of ``repeats`` synchronised calls after ``warmup`` calls; raw ms; peak MB."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    with PeakMemory(device) as pm:
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times), [round(t * 1e3, 3) for t in times], pm.mb


def count_work(fn):
    """(GFLOP, GB moved) of one call of ``fn``."""
    from torch.utils.flop_counter import FlopCounterMode

    from randwire_d2.cost import ByteCounter

    counter = ByteCounter()
    flops = FlopCounterMode(display=False)
    with flops, counter:
        fn()
    return flops.get_total_flops() / 1e9, counter.bytes / 1e9


def _rate(amount, seconds):
    return None if amount is None or not seconds else amount / seconds


def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


# --------------------------------------------------------------------- classification
def build_classifiers(args, device):
    import torchvision
    from randwire_d2.modeling.network import RandWireNet, build_graph_specs

    presets = TINY_PRESETS if args.tiny else {k: PRESETS[k] for k in args.presets}
    for name, (regime, channels, nodes) in presets.items():
        graphs = build_graph_specs(regime, nodes, "WS", {"k": 4, "p": 0.75}, 0)
        torch.manual_seed(0)
        net = RandWireNet(regime=regime, channels=channels, graphs=graphs, num_classes=1000,
                          drop_path=args.drop_path)
        meta = {"model": f"randwire-{name}", "preset": name, "regime": regime,
                "channels": channels, "nodes": nodes}
        yield meta, net, list(args.executors)
    torch.manual_seed(0)
    meta = {"model": "resnet50", "preset": None, "regime": None, "channels": None, "nodes": None}
    yield meta, torchvision.models.resnet50(weights=None), [None]


def fvcore_gflops(net, args, device):
    try:
        from fvcore.nn import FlopCountAnalysis

        x = torch.zeros(1, 3, args.image_size, args.image_size, device=device)
        analysis = FlopCountAnalysis(net.eval(), x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total() / 1e9
    except Exception:  # noqa: BLE001 - an analysis failure must not stop the benchmark
        return None



def backward_and_step(loss, opt, scaler=None):
    """One optimizer step; with fp16, through the gradient scaler."""
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def work_fields(prefix, gflop, gbytes, seconds):
    """FLOPs and bytes of one step and the rates they imply (None where not counted)."""
    tflops = _rate(gflop, seconds)
    return {
        f"{prefix}_gflop": _r(gflop), f"{prefix}_gbytes": _r(gbytes),
        f"{prefix}_achieved_tflops": _r(tflops and tflops / 1e3, 4),
        f"{prefix}_achieved_gbs": _r(_rate(gbytes, seconds), 2),
    }

def apply_executor(module, executor):
    """"lean", "reference" or "lean+recompute" on every stage of ``module``."""
    from randwire_d2.modeling.stage import set_executor

    name, _, option = executor.partition("+")
    set_executor(module, name, recompute=option == "recompute")


def cost_fields(net, executor, args, device):
    """randwire_d2.cost at ``--cost-batch`` images, fp32, eager (None fields when skipped)."""
    keys = ("saved_mb_per_img", "traffic_mb_per_img", "traffic_fwd_bwd_mb_per_img", "ops_per_step")
    if not args.cost_batch:
        return dict.fromkeys(keys)
    from randwire_d2.cost import training_cost

    if executor is not None:
        apply_executor(net, executor)
    net.to(device=device, memory_format=torch.contiguous_format)
    x = torch.randn(args.cost_batch, 3, args.image_size, args.image_size, device=device)
    cost = training_cost(net, x)
    return {k: cost[k] if k == "ops_per_step" else _r(cost[k], 2) for k in keys}


def bench_classifier(meta, net, executor, precision, args, device):
    row = dict(meta, executor=executor, precision=precision)
    reason = _unsupported(device, precision)
    if reason:
        return dict(row, status=reason)
    if executor is not None:
        apply_executor(net, executor)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net.to(device=device, memory_format=fmt)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def logits(out):
        return out["linear"] if isinstance(out, dict) else out

    def train():
        net.train()
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = F.cross_entropy(logits(net(x)).float(), labels)
        backward_and_step(loss, opt, scaler)

    def infer():
        net.eval()
        with torch.no_grad(), _autocast(device, precision):
            logits(net(x))

    try:
        t_train, raw_train, mem_train = timed(train, device, args.warmup, args.repeats)
        t_infer, raw_infer, mem_infer = timed(infer, device, args.warmup, args.repeats)
        g_train, b_train = count_work(train) if args.count_work else (None, None)
        g_infer, b_infer = count_work(infer) if args.count_work else (None, None)
    except Exception as exc:  # noqa: BLE001 - record and go on with the next row
        return dict(row, status=f"error: {type(exc).__name__}: {exc}"[:300])
    finally:
        opt.zero_grad(set_to_none=True)
    return dict(
        row,
        status="ok",
        train_ms=_r(t_train * 1e3), train_img_s=_r(args.batch / t_train, 2),
        train_times_ms=raw_train, train_peak_mem_mb=_r(mem_train, 1),
        infer_ms=_r(t_infer * 1e3), infer_img_s=_r(args.batch / t_infer, 2),
        infer_times_ms=raw_infer, infer_peak_mem_mb=_r(mem_infer, 1),
        **work_fields("train", g_train, b_train, t_train),
        **work_fields("infer", g_infer, b_infer, t_infer),
    )


def run_classification(args, device, log):
    rows = []
    for meta, net, executors in build_classifiers(args, device):
        params = sum(p.numel() for p in net.parameters()) / 1e6
        gflops = fvcore_gflops(net, args, device)
        for executor in executors:
            cost = cost_fields(net, executor, args, device)
            log(f"# cost {meta['model']} [{executor}]: {cost}")
            if args.cost_only:
                rows.append(dict(meta, executor=executor, precision="fp32", status="ok",
                                 params_m=_r(params, 3), fvcore_gflops_per_image=_r(gflops), **cost))
                continue
            if args.compile and executor is not None:
                net.compile()  # in place: parameter names unchanged
            for precision in args.precisions:
                row = bench_classifier(meta, net, executor, precision, args, device)
                row.update(params_m=_r(params, 3), fvcore_gflops_per_image=_r(gflops), compiled=bool(
                    args.compile and executor is not None), **cost)
                rows.append(row)
                log(_cls_line(row))
        del net
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -------------------------------------------------------------------------- detection
R50_FPN_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"


def detection_cfgs(args, device):
    """(name, cfg or None, executors, why cfg is None) per detector."""
    from detectron2.config import get_cfg
    from randwire_d2.compat import model_zoo_config_file
    from randwire_d2.engine import setup_cfg

    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device.type, "MODEL.RANDWIRE.NORM", "BN"]
    if args.tiny:
        opts += ["MODEL.RANDWIRE.CHANNELS", 16, "MODEL.RANDWIRE.NODES", 10]
    rw = setup_cfg(os.path.join(REPO, "configs", "randwire_frcnn.yaml"), opts)
    try:  # found by path: detectron2.model_zoo needs pkg_resources at HEAD
        r50_file = model_zoo_config_file(R50_FPN_CONFIG)
    except FileNotFoundError as exc:
        return [("randwire-fpn", rw, list(args.executors), None), ("r50-fpn", None, [None], f"skipped: {exc}")]
    r50 = get_cfg()
    r50.merge_from_file(r50_file)
    r50.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", device.type])
    return [("randwire-fpn", rw, list(args.executors), None), ("r50-fpn", r50, [None], None)]


def det_inputs(n, size, device, seed):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(n):
        image = torch.randint(0, 256, (3, h, w), generator=g).float().to(device)
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(8, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1).to(device))
        inst.gt_classes = torch.randint(0, 80, (8,), generator=g).to(device)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def bench_detector(name, model, executor, precision, args, device):
    from detectron2.utils.events import EventStorage
    from randwire_d2.modeling.stage import set_executor

    row = {"model": name, "executor": executor, "precision": precision}
    reason = _unsupported(device, precision)
    if reason:
        return dict(row, status=reason)
    if executor is not None:
        apply_executor(model, executor)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    train_batch = det_inputs(args.det_batch, args.det_size, device, 0)
    test_batch = det_inputs(1, args.det_size, device, 1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            losses = model(train_batch)
        loss = sum(v.float() for v in losses.values())
        backward_and_step(loss, opt, scaler)

    def infer():
        model.eval()
        with torch.no_grad(), _autocast(device, precision):
            model(test_batch)

    try:
        with EventStorage(0):  # detectron2 logs training statistics into one
            t_train, raw_train, mem_train = timed(train, device, args.warmup, args.repeats)
            t_infer, raw_infer, mem_infer = timed(infer, device, args.warmup, args.repeats)
            g_train, b_train = count_work(train) if args.count_work else (None, None)
            g_infer, b_infer = count_work(infer) if args.count_work else (None, None)
    except Exception as exc:  # noqa: BLE001
        return dict(row, status=f"error: {type(exc).__name__}: {exc}"[:300], params_m=_r(params))
    finally:
        opt.zero_grad(set_to_none=True)  # free the gradients before the next model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(
        row, status="ok", params_m=_r(params),
        train_ms_iter=_r(t_train * 1e3), train_times_ms=raw_train, train_peak_mem_mb=_r(mem_train, 1),
        infer_ms_image=_r(t_infer * 1e3), infer_times_ms=raw_infer, infer_peak_mem_mb=_r(mem_infer, 1),
        **work_fields("train", g_train, b_train, t_train),
        **work_fields("infer", g_infer, b_infer, t_infer),
    )


def run_detection(args, device, log):
    rows = []
    from detectron2.modeling import build_model

    for name, cfg, executors, why in detection_cfgs(args, device):
        if cfg is None:  # the baseline's config is missing: say so in its row, measure the rest
            for precision in args.precisions:
                rows.append({"model": name, "executor": None, "precision": precision, "status": why})
                log(_det_line(rows[-1]))
            continue
        torch.manual_seed(0)
        model = build_model(cfg)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        for executor in executors:
            for precision in args.precisions:
                row = bench_detector(name, model, executor, precision, args, device)
                rows.append(row)
                log(_det_line(row))
        del model
        gc.collect()
    return rows


# ---------------------------------------------------------------------------- output
def _fmt(v, width, nd=1):
    return f"{'-' if v is None else (f'{v:.{nd}f}' if isinstance(v, float) else v):>{width}}"


def _row_line(r, train_key, infer_key):
    head = f"{r['model']:22s} {str(r['executor'] or '-'):9s} {r['precision']:5s}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}"
    return (f"{head} {_fmt(r[train_key], 10)} {_fmt(r[infer_key], 10)} "
            f"{_fmt(r['train_peak_mem_mb'], 10)} {_fmt(r['infer_peak_mem_mb'], 10)} "
            f"{_fmt(r['train_achieved_gbs'], 8)} {_fmt(r['train_achieved_tflops'], 8, 3)}")


def _cls_line(r):
    return _row_line(r, "train_img_s", "infer_img_s")


def _det_line(r):
    return _row_line(r, "train_ms_iter", "infer_ms_image")


CLS_HEADER = (f"{'classification':22s} {'executor':9s} {'prec':5s} {'train img/s':>10s} "
              f"{'infer img/s':>10s} {'train MB':>10s} {'infer MB':>10s} {'trainGB/s':>8s} {'trainTF/s':>8s}")
DET_HEADER = (f"{'detection':22s} {'executor':9s} {'prec':5s} {'train ms/it':>10s} "
              f"{'infer ms/im':>10s} {'train MB':>10s} {'infer MB':>10s} {'trainGB/s':>8s} {'trainTF/s':>8s}")


def ratios(cls_rows, det_rows):
    out = []
    ok = [r for r in cls_rows if r.get("status") == "ok" and r.get("train_img_s")]
    base = {r["precision"]: r for r in ok if r["model"] == "resnet50"}
    target = "regular-c109" if any(r["preset"] == "regular-c109" for r in ok) else None
    for r in ok:
        if r["model"] == "resnet50" or (target and r["preset"] != target) or r["precision"] not in base:
            continue
        b = base[r["precision"]]
        out.append({"what": f"classification train img/s {r['model']} / resnet50", "executor": r["executor"],
                    "precision": r["precision"], "randwire": r["train_img_s"], "baseline": b["train_img_s"],
                    "ratio": _r(r["train_img_s"] / b["train_img_s"])})
    seen = set()
    for r in cls_rows:
        b = next((x for x in cls_rows if x["model"] == "resnet50"), None)
        key = (r["model"], r["executor"])
        if r["model"] == "resnet50" or b is None or key in seen:
            continue
        seen.add(key)
        for field in ("saved_mb_per_img", "traffic_mb_per_img", "traffic_fwd_bwd_mb_per_img", "ops_per_step"):
            if r.get(field) is not None and b.get(field):
                out.append({"what": f"{field} {r['model']} / resnet50", "executor": r["executor"],
                            "precision": "fp32", "randwire": r[field], "baseline": b[field],
                            "ratio": _r(r[field] / b[field])})
    ok = [r for r in det_rows if r.get("status") == "ok"]
    base = {r["precision"]: r for r in ok if r["model"] == "r50-fpn"}
    for r in ok:
        if r["model"] != "randwire-fpn" or r["precision"] not in base:
            continue
        b = base[r["precision"]]
        for key, what in (("train_ms_iter", "detection train ms/iter"),
                          ("train_peak_mem_mb", "detection train peak memory MB")):
            if r.get(key) is not None and b.get(key):
                out.append({"what": f"{what} randwire-fpn / r50-fpn", "executor": r["executor"],
                            "precision": r["precision"], "randwire": r[key], "baseline": b[key],
                            "ratio": _r(r[key] / b[key])})
    return out


def device_info(device, threads):
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "threads": threads,
                "capability": f"{props.major}.{props.minor}",
                "memory_gb": round(props.total_memory / 2**30, 1)}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"type": "cpu", "name": name, "threads": threads}


def versions():
    import detectron2
    import torchvision

    try:
        import fvcore
        fv = getattr(fvcore, "__version__", "unknown")
    except ImportError:
        fv = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "detectron2": detectron2.__version__, "fvcore": fv}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="RandWire vs ResNet-50 speed/memory benchmark (see module docstring).")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="CI size: batch 2, 64 px, C=16, N=10; detection 1 image 128 px")
    ap.add_argument("--batch", type=int, default=None, help="classification batch (256 cuda, 8 cpu, 2 tiny)")
    ap.add_argument("--image-size", type=int, default=None, help="classification px (224; 64 tiny)")
    ap.add_argument("--det-batch", type=int, default=None, help="detection training images (8 cuda, 1 cpu/tiny)")
    ap.add_argument("--det-size", type=str, default=None, help="detection H,W (800,1216 cuda; 512,768 cpu; 128,128 tiny)")
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--executors", default="lean,lean+recompute,reference",
                    help="RandWire stage executors to time (lean+recompute: lean with RECOMPUTE)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the RandWire networks (as MODEL.RANDWIRE.COMPILE does)")
    ap.add_argument("--cost-only", action="store_true",
                    help="only the device-independent cost model (classification; no timing, no detection)")
    ap.add_argument("--cost-batch", type=int, default=4,
                    help="batch of the device-independent cost model (randwire_d2.cost; 0: skip)")
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
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in args.precisions if p not in DTYPES]
    if bad:
        ap.error(f"--precisions: unknown {bad}; choose from {list(DTYPES)}")
    from randwire_d2.modeling.stage import EXECUTORS

    args.executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    bad = [e for e in args.executors if e.partition("+")[0] not in EXECUTORS
           or e.partition("+")[2] not in ("", "recompute") or e == "reference+recompute"]
    if bad or not args.executors:
        ap.error(f"--executors: unknown {bad}; choose from {list(EXECUTORS)} (+recompute for lean)")
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    bad = [p for p in args.presets if p not in PRESETS]
    if bad:
        ap.error(f"--presets: unknown {bad}; choose from {list(PRESETS)}")
    tiny = args.tiny
    if args.batch is None:
        args.batch = 2 if tiny else (256 if cuda else 8)
    if args.image_size is None:
        args.image_size = 64 if tiny else 224
    if args.det_batch is None:
        args.det_batch = 1 if tiny or not cuda else 8
    size = args.det_size or ("128,128" if tiny else ("800,1216" if cuda else "512,768"))
    args.det_size = tuple(int(s) for s in size.split(","))
    if len(args.det_size) != 2:
        ap.error("--det-size takes H,W")
    if args.warmup is None:
        args.warmup = 1 if tiny else (5 if cuda else 2)
    if args.repeats is None:
        args.repeats = 3 if tiny else (20 if cuda else 5)
    if args.threads is None and tiny and not cuda:
        args.threads = 1  # CI machines are shared: OpenMP spin-waits under oversubscription
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import randwire_d2  # noqa: F401  (registers the backbones)

    def log(line):
        print(line, flush=True)

    result = {
        "schema": 1,
        "date": args.date or datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + (sys.argv if argv is None else ["tools/benchmark.py", *argv])),
        "device": device_info(device, torch.get_num_threads()),
        "versions": versions(),
        "settings": {
            "tiny": args.tiny, "batch": args.batch, "image_size": args.image_size,
            "det_batch": args.det_batch, "det_size": list(args.det_size), "warmup": args.warmup,
            "repeats": args.repeats, "precisions": args.precisions, "executors": args.executors,
            "channels_last": args.channels_last, "compile": args.compile, "cost_batch": args.cost_batch,
            "cost_only": args.cost_only, "drop_path": args.drop_path,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        },
        "memory_kind": memory_kind(device),
        "classification": [],
        "detection": [],
        "ratios": [],
    }
    log(f"# {result['device']['name']} ({device.type}, {result['device']['threads']} threads), "
        f"torch {result['versions']['torch']}")
    if not args.skip_classification:
        log(f"# classification: batch {args.batch}, {args.image_size} px")
        if not args.cost_only:
            log(CLS_HEADER)
        result["classification"] = run_classification(args, device, log)
    if not args.skip_detection and not args.cost_only:
        log(f"# detection: train {args.det_batch} x {args.det_size[0]}x{args.det_size[1]}, infer 1 image")
        log(DET_HEADER)
        result["detection"] = run_detection(args, device, log)
    result["ratios"] = ratios(result["classification"], result["detection"])
    for r in result["ratios"]:
        log(f"ratio {r['what']} [{r['executor']}, {r['precision']}]: {r['ratio']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)
        log(f"# wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
