"""The one-call GPU proof: ``tools/benchmark.py --suite gpu`` (<= 8 minutes on one H100/H200).

Sections, in this order, the JSON rewritten after each (a run cut short keeps what it did):

1. ``environment``: device, driver, CUDA, cuDNN, NCCL, torch, torchvision, detectron2.
2. ``correctness``: lean vs reference executor on the device, fp32 / bf16 / fp16 with a
   GradScaler, a few SGD steps from the same weights: in fp32 loss per step and the
   gradients of the first step must agree, in bf16 / fp16 lean's must be as close to fp32's
   as the reference's (TOLERANCE); then DDP at world size 1 (NCCL on CUDA, gloo on CPU) must
   give the plain model's gradients.
3. ``classification``: C=109 training steps at batch 256, 224 px, bf16, DropPath 0.1, for
   {lean, reference} x {NCHW, channels_last}, and torchvision's ResNet-50 the same way:
   img/s (median), ``max_memory_allocated`` and ``max_memory_reserved`` (absolute, MB).
4. ``profile``: ``torch.profiler`` over one lean C=109 channels-last step: kernel count,
   GPU busy and idle share of the step's wall time, the top kernels by time.
5. ``detection``: Faster R-CNN FPN training, RandWire-FPN (configs/randwire_frcnn.yaml,
   FrozenBN, FREEZE_AT 2) vs detectron2's R50-FPN, 2 images of 800x1216, bf16: ms/iter,
   the training step's peak memory above model, optimizer state and inputs, their ratios.
6. ``loader``: the classification loader on real JPEGs (foolbox's photos at 500x375), both
   decode paths, the device path decoding on this GPU.

Precision is applied with ``torch.autocast`` (and ``torch.amp.GradScaler`` for fp16)
directly. ``smoke=True`` runs the same code at tiny sizes (C=16, N=10, 64 px, batch 2;
detection 1 image of 128x128; 16 loader images), e.g. on CPU in CI.
"""
from __future__ import annotations

import copy
import datetime
import os
import platform
import subprocess
import tempfile
import time

import torch
from torch.nn import functional as F

from .measure import autocast, rnd, sync
from .report import write_json

__all__ = ["SECTIONS", "run_gpu_suite"]

SECTIONS = ("environment", "correctness", "classification", "profile", "detection", "loader")


# --------------------------------------------------------------------------- sizes
def _sizes(smoke: bool):
    if smoke:
        return dict(channels=16, nodes=10, batch=2, image=64, check_batch=2, check_steps=2,
                    warmup=1, repeats=2, det_images=1, det_size=(128, 128), loader_images=16,
                    loader_batch=4, loader_batches=2, loader_workers=[0])
    cores = len(os.sched_getaffinity(0))
    return dict(channels=109, nodes=32, batch=256, image=224, check_batch=16, check_steps=3,
                warmup=3, repeats=10, det_images=2, det_size=(800, 1216), loader_images=1024,
                loader_batch=256, loader_batches=8, loader_workers=sorted({min(8, cores), cores}))


def _randwire(sz, drop_path=0.0, num_classes=1000):
    from ..modeling.network import RandWireNet, build_graph_specs

    graphs = build_graph_specs("regular", sz["nodes"], "WS", {"k": 4, "p": 0.75}, 0)
    torch.manual_seed(0)
    return RandWireNet(regime="regular", channels=sz["channels"], graphs=graphs, num_classes=num_classes,
                       drop_path=drop_path)


def _logits(out):
    return out["linear"] if isinstance(out, dict) else out


# --------------------------------------------------------------------------- 1. environment
def environment(device):
    import detectron2
    import torchvision

    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "detectron2": detectron2.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cpu_cores": len(os.sched_getaffinity(0)), "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gb=round(props.total_memory / 2**30, 1),
                   nccl=".".join(map(str, torch.cuda.nccl.version())), driver=_driver_version())
    else:
        env.update(name=platform.processor() or platform.machine(), nccl=None, driver=None)
    return env


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return None


# --------------------------------------------------------------------------- 2. correctness
# relative, loss and gradient norm: fp32 lean vs reference; bf16 / fp16: lean's error against
# fp32 at most 1.5x the reference's plus this (the executors round differently: lean's gathers
# accumulate in fp32, so comparing them with each other measures the precision's noise)
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-3, "fp16": 5e-3}


def _train_steps(net, x, labels, precision, steps, device):
    """Losses of ``steps`` SGD steps, the gradients of the first whose gradients are finite
    (fp16: a GradScaler's first scale may overflow, and that step is skipped) and its index."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    # a modest first scale: the default 2**16 overflows on the first steps, which are then skipped
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8) if precision == "fp16" else None
    losses, grads, grad_step = [], None, None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(_logits(net(x)).float(), labels)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        if grads is None:
            found = {n: p.grad.detach().float().clone() for n, p in net.named_parameters() if p.grad is not None}
            if all(bool(torch.isfinite(g).all()) for g in found.values()):
                grads, grad_step = found, step
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        losses.append(float(loss.detach()))
    return losses, grads, grad_step


def _grad_error(a, b):
    """|grad_b - grad_a| / |grad_a| over all parameters together, and the largest per parameter."""
    diff = sum(float((a[n] - b[n]).norm()) ** 2 for n in a) ** 0.5
    total = sum(float(a[n].norm()) ** 2 for n in a) ** 0.5
    worst = max(float((a[n] - b[n]).norm()) / max(float(a[n].norm()), 1e-12) for n in a)
    return diff / max(total, 1e-12), worst


def correctness(device, sz, log):
    from ..modeling.stage import set_executor

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sz["check_batch"], 3, sz["image"], sz["image"], generator=g).to(device)
    labels = torch.randint(0, 1000, (sz["check_batch"],), generator=g).to(device)
    base = _randwire(sz).to(device)
    rows = []
    try:
        for precision in ("fp32", "bf16", "fp16"):
            out = {}
            for executor in ("lean", "reference"):
                net = set_executor(copy.deepcopy(base), executor)
                out[executor] = _train_steps(net, x, labels, precision, sz["check_steps"], device)
            (l_lean, g_lean, s_lean), (l_ref, g_ref, s_ref) = out["lean"], out["reference"]
            if precision == "fp32":
                exact = (l_ref, g_ref)
            if g_lean is None or g_ref is None or s_lean != s_ref:
                rows.append({"check": "lean vs reference", "precision": precision, "ok": False,
                             "status": "no step with finite gradients in both"})
                log(f"# correctness {precision}: FAILED, no step with finite gradients in both")
                continue
            loss_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(l_lean, l_ref))
            grad_err, worst = _grad_error(g_ref, g_lean)
            tol = TOLERANCE[precision]
            row = {"check": "lean vs reference", "precision": precision, "steps": sz["check_steps"],
                   "loss_lean": [rnd(v, 6) for v in l_lean], "loss_reference": [rnd(v, 6) for v in l_ref],
                   "max_loss_rel_error": rnd(loss_err, 7), "grad_rel_error": rnd(grad_err, 7),
                   "worst_parameter_grad_rel_error": rnd(worst, 7), "tolerance": tol}
            if precision == "fp32":
                row["ok"] = bool(loss_err <= tol and grad_err <= tol)
            else:  # each against the fp32 reference, at the step whose gradients both kept
                first = {n: abs(l[s_ref] - exact[0][s_ref]) / max(abs(exact[0][s_ref]), 1e-12)
                         for n, l in (("lean", l_lean), ("reference", l_ref))}
                vs_fp32 = {n: _grad_error(exact[1], g)[0] for n, g in (("lean", g_lean), ("reference", g_ref))}
                row.update(loss_rel_error_vs_fp32={n: rnd(v, 7) for n, v in first.items()},
                           grad_rel_error_vs_fp32={n: rnd(v, 7) for n, v in vs_fp32.items()},
                           ok=bool(s_ref == 0 and vs_fp32["lean"] <= 1.5 * vs_fp32["reference"] + tol
                                   and first["lean"] <= 1.5 * first["reference"] + tol))
            rows.append(row)
            vs = row.get("grad_rel_error_vs_fp32")
            log(f"# correctness {precision}: lean vs reference loss {loss_err:.2e}, grad {grad_err:.2e}"
                + (f"; grad vs fp32 lean {vs['lean']:.2e}, reference {vs['reference']:.2e}" if vs else "")
                + f" (tol {tol}) {'ok' if row['ok'] else 'FAILED'}")
        rows.append(_ddp_check(base, x, labels, device))
        log(f"# correctness DDP world size 1 ({rows[-1]['backend']}): {rows[-1]}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_check(base, x, labels, device):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    row = {"check": "DDP world size 1", "backend": backend}
    plain = copy.deepcopy(base)
    _, g_plain, _ = _train_steps(plain, x, labels, "fp32", 1, device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(copy.deepcopy(base), device_ids=[device.index or 0] if device.type == "cuda"
                                      else None)
        _, g_ddp, _ = _train_steps(ddp, x, labels, "fp32", 1, device)
        g_ddp = {n[len("module."):]: v for n, v in g_ddp.items()}
        err = _grad_error(g_plain, g_ddp)[1]
        row.update(max_grad_rel_error=rnd(err, 7), tolerance=1e-5, ok=bool(err <= 1e-5 and set(g_ddp) == set(g_plain)))
    finally:
        if started:
            dist.destroy_process_group()
    return row


# --------------------------------------------------------------------------- 3. classification
def _step_fn(net, x, labels, opt, device, precision="bf16"):
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(_logits(net(x)).float(), labels)
        loss.backward()
        opt.step()
    return step


def _classification_row(name, net, executor, layout, device, sz):
    from ..modeling.stage import set_executor

    row = {"model": name, "executor": executor, "layout": layout, "precision": "bf16", "batch": sz["batch"],
           "image_size": sz["image"]}
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    if executor is not None:
        set_executor(net, executor)
    net.to(device=device, memory_format=fmt).train()
    x = torch.randn(sz["batch"], 3, sz["image"], sz["image"], device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (sz["batch"],), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    step = _step_fn(net, x, labels, opt, device)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(sz["warmup"]):
            step()
        times = []
        for _ in range(sz["repeats"]):
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)
        times.sort()
        median = times[len(times) // 2]
        row.update(status="ok", img_s=rnd(sz["batch"] / median, 1), step_ms=rnd(median * 1e3, 2),
                   times_ms=[rnd(t * 1e3, 2) for t in times])
        if device.type == "cuda":
            row.update(max_memory_allocated_mb=rnd(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                       max_memory_reserved_mb=rnd(torch.cuda.max_memory_reserved(device) / 2**20, 1))
        else:
            row.update(max_memory_allocated_mb=None, max_memory_reserved_mb=None)
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status=f"error: out of memory: {str(exc).splitlines()[0][:200]}")
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
    return row


def classification(device, sz, log):
    import torchvision

    rows = []
    torch.backends.cudnn.benchmark = True
    net = _randwire(sz, drop_path=0.1)
    name = f"randwire-regular-c{sz['channels']}"
    for executor in ("lean", "reference"):
        for layout in ("nchw", "channels_last"):
            rows.append(_classification_row(name, net, executor, layout, device, sz))
            log(f"# classification {rows[-1]}")
    del net
    torch.manual_seed(0)
    r50 = torchvision.models.resnet50(weights=None)
    for layout in ("nchw", "channels_last"):
        rows.append(_classification_row("resnet50", r50, None, layout, device, sz))
        log(f"# classification {rows[-1]}")
    return rows


# --------------------------------------------------------------------------- 4. profile
def profile(device, sz, log, top=15):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from ..modeling.stage import set_executor

    net = set_executor(_randwire(sz, drop_path=0.1), "lean").to(device=device, memory_format=torch.channels_last)
    x = torch.randn(sz["batch"], 3, sz["image"], sz["image"], device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (sz["batch"],), device=device)
    step = _step_fn(net, x, labels, torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9), device)
    for _ in range(sz["warmup"]):
        step()
    sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        t = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - t
    events = [e for e in prof.events() if (e.device_type.name == "CUDA" if cuda else e.name.startswith("aten::"))]
    if cuda:  # GPU kernels: busy time is the union of their intervals
        spans = sorted((e.time_range.start, e.time_range.end) for e in events)
        busy, end = 0.0, None
        for s, e in spans:
            if end is None or s > end:
                busy += e - s
                end = e
            elif e > end:
                busy += e - end
                end = e
        busy_s = busy / 1e6
    else:
        busy_s = None
    totals = {}
    for e in events:
        key = e.name[:120]
        t_us = e.device_time if cuda else e.cpu_time  # self time per event on CPU is nested: use totals
        n, total = totals.get(key, (0, 0.0))
        totals[key] = (n + 1, total + t_us)
    top_rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    row = {"model": f"randwire-regular-c{sz['channels']}", "executor": "lean", "layout": "channels_last",
           "precision": "bf16", "batch": sz["batch"], "wall_ms": rnd(wall * 1e3, 2),
           "kernel_count": len(events), "kind": "cuda kernels" if cuda else "aten ops (CPU)",
           "gpu_busy_ms": rnd(busy_s * 1e3, 2) if cuda else None,
           "gpu_idle_share": rnd(1 - busy_s / wall, 3) if cuda else None,
           "top": [{"name": k, "calls": n, "total_ms": rnd(t / 1e3, 3)} for k, (n, t) in top_rows]}
    log(f"# profile: {row['kernel_count']} {row['kind']}, wall {row['wall_ms']} ms, idle share {row['gpu_idle_share']}")
    return row


# --------------------------------------------------------------------------- 5. detection
def detection(device, sz, log):
    from detectron2.modeling import build_model

    from .detection import bench_detector, detection_cfgs
    from .settings import Settings

    s = Settings(device=device.type, tiny=sz["channels"] != 109, det_batch=sz["det_images"],
                 det_size=sz["det_size"], warmup=sz["warmup"], repeats=sz["repeats"], executors=["lean"],
                 count_work=False).resolve()
    rows = []
    for name, cfg, executors, why in detection_cfgs(s, device, randwire_opts=()):  # the config's FrozenBN
        if cfg is None:
            rows.append({"model": name, "status": why})
            continue
        torch.manual_seed(0)
        model = build_model(cfg)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # train_peak_mem_mb: the training step's peak above model, optimizer state and inputs
        row = bench_detector(name, model, executors[0], "bf16", s, device)
        row.update(images=s.det_batch, size=list(s.det_size), norm=cfg.MODEL.RESNETS.NORM if name == "r50-fpn"
                   else cfg.MODEL.RANDWIRE.NORM, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
        rows.append(row)
        log(f"# detection {name}: {row.get('train_ms_iter')} ms/iter, status {row.get('status')}")
        del model
    ok = {r["model"]: r for r in rows if r.get("status") == "ok"}
    if {"randwire-fpn", "r50-fpn"} <= set(ok):
        for key in ("train_ms_iter", "train_peak_mem_mb"):
            a, b = ok["randwire-fpn"].get(key), ok["r50-fpn"].get(key)
            if a and b:
                rows.append({"ratio": f"{key} randwire-fpn / r50-fpn", "value": rnd(a / b)})
    return rows


# --------------------------------------------------------------------------- 6. loader
def loader(device, sz, log):
    import randwire_d2.data  # noqa: F401
    from detectron2.config import get_cfg

    from ..config import add_classification_config, add_randwire_config
    from ..data.classification import register_image_folder
    from .loader import foolbox_photo_tree, loader_report, remove_tree

    tmp = tempfile.mkdtemp(prefix="rw_gpu_suite_loader_")
    try:
        root = foolbox_photo_tree(tmp, sz["loader_images"], (500, 375))
        name = f"gpu_suite_loader_{os.getpid()}_{int(time.time() * 1e3)}"
        register_image_folder(name, root)
        cfg = get_cfg()
        add_randwire_config(cfg)
        add_classification_config(cfg)
        cfg.DATASETS.TRAIN = (name,)
        cfg.SOLVER.IMS_PER_BATCH = sz["loader_batch"]
        cfg.MODEL.DEVICE = device.type
        return loader_report(cfg, name, device=str(device), workers=sz["loader_workers"],
                             batches=sz["loader_batches"], log=lambda line: log(f"# loader {line}"))
    finally:
        remove_tree(tmp)


# --------------------------------------------------------------------------- the run
def run_gpu_suite(*, device: str = "cuda", smoke: bool = False, json_path: str, command: str = "", log=print):
    """Run the sections in order, rewriting ``json_path`` after each; return the result."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    import randwire_d2  # noqa: F401  (registers the backbones)

    sz = _sizes(smoke)
    if smoke and dev.type == "cpu":
        torch.set_num_threads(1)  # CI machines are shared: OpenMP spin-waits under oversubscription
    result = {"schema": 1, "suite": "gpu", "smoke": smoke, "command": command,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sz.items()},
              "precision_via": "torch.autocast (+ torch.amp.GradScaler for fp16)",
              "sections_done": [], "seconds": {}}
    steps = {"environment": lambda: environment(dev), "correctness": lambda: correctness(dev, sz, log),
             "classification": lambda: classification(dev, sz, log), "profile": lambda: profile(dev, sz, log),
             "detection": lambda: detection(dev, sz, log), "loader": lambda: loader(dev, sz, log)}
    for section in SECTIONS:
        log(f"## {section}")
        t = time.perf_counter()
        try:
            result[section] = steps[section]()
        except Exception as exc:  # noqa: BLE001 - record it and go on: later sections still measure
            result[section] = {"status": f"error: {type(exc).__name__}: {exc}"[:500]}
            log(f"# {section} failed: {result[section]['status']}")
        result["seconds"][section] = rnd(time.perf_counter() - t, 1)
        result["sections_done"].append(section)
        write_json(result, json_path)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    log(f"# wrote {json_path}")
    return result
