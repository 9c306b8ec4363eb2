"""Classification rows: RandWire presets and torchvision's ResNet-50, training and inference."""
from __future__ import annotations

import gc

import torch
from torch.nn import functional as F

from .measure import autocast, backward_and_step, count_work, rnd, timed, unsupported, work_fields
from .settings import PRESETS, TINY_PRESETS

__all__ = ["apply_executor", "bench_classifier", "build_classifiers", "cost_fields", "fvcore_gflops",
           "run_classification"]


def build_classifiers(s):
    """(row meta, network, executors) for every RandWire preset of ``s`` and ResNet-50 last."""
    import torchvision

    from ..modeling.network import RandWireNet, build_graph_specs

    presets = TINY_PRESETS if s.tiny else {k: PRESETS[k] for k in s.presets}
    for name, (regime, channels, nodes) in presets.items():
        graphs = build_graph_specs(regime, nodes, "WS", {"k": 4, "p": 0.75}, 0)
        torch.manual_seed(0)
        net = RandWireNet(regime=regime, channels=channels, graphs=graphs, num_classes=1000,
                          drop_path=s.drop_path)
        meta = {"model": f"randwire-{name}", "preset": name, "regime": regime,
                "channels": channels, "nodes": nodes}
        yield meta, net, list(s.executors)
    torch.manual_seed(0)
    meta = {"model": "resnet50", "preset": None, "regime": None, "channels": None, "nodes": None}
    yield meta, torchvision.models.resnet50(weights=None), [None]


def fvcore_gflops(net, image_size, device):
    """Forward GFLOPs per image by fvcore (1 FLOP per multiply-add), or None if it fails."""
    try:
        from fvcore.nn import FlopCountAnalysis

        x = torch.zeros(1, 3, image_size, image_size, device=device)
        analysis = FlopCountAnalysis(net.eval(), x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total() / 1e9
    except Exception:  # noqa: BLE001 - an analysis failure must not stop the benchmark
        return None


def apply_executor(module, executor):
    """"lean", "reference" or "lean+recompute" on every stage of ``module``."""
    from ..modeling.stage import set_executor

    name, _, option = executor.partition("+")
    set_executor(module, name, recompute=option == "recompute")


COST_KEYS = ("saved_mb_per_img", "traffic_mb_per_img", "traffic_fwd_bwd_mb_per_img", "ops_per_step")


def cost_fields(net, executor, s, device):
    """randwire_d2.cost at ``s.cost_batch`` images, fp32, eager (None fields when skipped)."""
    if not s.cost_batch:
        return dict.fromkeys(COST_KEYS)
    from ..cost import training_cost

    if executor is not None:
        apply_executor(net, executor)
    net.to(device=device, memory_format=torch.contiguous_format)
    x = torch.randn(s.cost_batch, 3, s.image_size, s.image_size, device=device)
    cost = training_cost(net, x)
    return {k: cost[k] if k == "ops_per_step" else rnd(cost[k], 2) for k in COST_KEYS}


def bench_classifier(meta, net, executor, precision, s, device):
    """One row: timed training step and inference forward of ``net`` (and their work)."""
    row = dict(meta, executor=executor, precision=precision)
    reason = unsupported(device, precision)
    if reason:
        return dict(row, status=reason)
    if executor is not None:
        apply_executor(net, executor)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    net.to(device=device, memory_format=fmt)
    x = torch.randn(s.batch, 3, s.image_size, s.image_size, device=device)
    x = x.contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (s.batch,), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def logits(out):
        return out["linear"] if isinstance(out, dict) else out

    def train():
        net.train()
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(logits(net(x)).float(), labels)
        backward_and_step(loss, opt, scaler)

    def infer():
        net.eval()
        with torch.no_grad(), autocast(device, precision):
            logits(net(x))

    try:
        t_train, raw_train, mem_train = timed(train, device, s.warmup, s.repeats)
        t_infer, raw_infer, mem_infer = timed(infer, device, s.warmup, s.repeats)
        g_train, b_train = count_work(train) if s.count_work else (None, None)
        g_infer, b_infer = count_work(infer) if s.count_work else (None, None)
    except Exception as exc:  # noqa: BLE001 - record and go on with the next row
        return dict(row, status=f"error: {type(exc).__name__}: {exc}"[:300])
    finally:
        opt.zero_grad(set_to_none=True)
    return dict(
        row,
        status="ok",
        train_ms=rnd(t_train * 1e3), train_img_s=rnd(s.batch / t_train, 2),
        train_times_ms=raw_train, train_peak_mem_mb=rnd(mem_train, 1),
        infer_ms=rnd(t_infer * 1e3), infer_img_s=rnd(s.batch / t_infer, 2),
        infer_times_ms=raw_infer, infer_peak_mem_mb=rnd(mem_infer, 1),
        **work_fields("train", g_train, b_train, t_train),
        **work_fields("infer", g_infer, b_infer, t_infer),
    )


def run_classification(s, device, log):
    """Every classification row of ``s`` (cost model only with ``s.cost_only``)."""
    from .report import cls_line

    rows = []
    for meta, net, executors in build_classifiers(s):
        params = sum(p.numel() for p in net.parameters()) / 1e6
        gflops = fvcore_gflops(net, s.image_size, device)
        for executor in executors:
            cost = cost_fields(net, executor, s, device)
            log(f"# cost {meta['model']} [{executor}]: {cost}")
            if s.cost_only:
                rows.append(dict(meta, executor=executor, precision="fp32", status="ok",
                                 params_m=rnd(params, 3), fvcore_gflops_per_image=rnd(gflops), **cost))
                continue
            if s.compile and executor is not None:
                net.compile()  # in place: parameter names unchanged
            for precision in s.precisions:
                row = bench_classifier(meta, net, executor, precision, s, device)
                row.update(params_m=rnd(params, 3), fvcore_gflops_per_image=rnd(gflops), compiled=bool(
                    s.compile and executor is not None), **cost)
                rows.append(row)
                log(cls_line(row))
        del net
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
