"""Detection rows: Faster R-CNN FPN with the RandWire backbone vs detectron2's R50-FPN."""
from __future__ import annotations

import gc
import os

import torch

from .classification import apply_executor
from .measure import autocast, backward_and_step, count_work, rnd, timed, unsupported, work_fields

__all__ = ["R50_FPN_CONFIG", "RANDWIRE_FPN_CONFIG", "bench_detector", "det_inputs", "detection_cfgs",
           "run_detection"]

R50_FPN_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
RANDWIRE_FPN_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                   "configs", "randwire_frcnn.yaml")


def detection_cfgs(s, device, randwire_opts=("MODEL.RANDWIRE.NORM", "BN"), r50_opts=(), randwire_config=None):
    """(name, cfg or None, executors, why cfg is None) per detector; ``*_opts`` are extra overrides,
    ``randwire_config`` another RandWire-FPN yaml (default configs/randwire_frcnn.yaml)."""
    from detectron2.config import get_cfg

    from ..compat import model_zoo_config_file
    from ..engine import setup_cfg

    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device.type, *randwire_opts]
    if s.tiny:
        opts += ["MODEL.RANDWIRE.CHANNELS", 16, "MODEL.RANDWIRE.NODES", 10]
    rw = setup_cfg(randwire_config or RANDWIRE_FPN_CONFIG, opts)
    try:  # found by path: detectron2.model_zoo needs pkg_resources at HEAD
        r50_file = model_zoo_config_file(R50_FPN_CONFIG)
    except FileNotFoundError as exc:
        return [("randwire-fpn", rw, list(s.executors), None), ("r50-fpn", None, [None], f"skipped: {exc}")]
    r50 = get_cfg()
    r50.merge_from_file(r50_file)
    r50.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", device.type, *r50_opts])
    return [("randwire-fpn", rw, list(s.executors), None), ("r50-fpn", r50, [None], None)]


def det_inputs(n, size, device, seed):
    """``n`` random images of ``size`` (H, W) with 8 random boxes each, detectron2's input format."""
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


def bench_detector(name, model, executor, precision, s, device):
    """One row: timed training iteration (``s.det_batch`` images) and batch-1 inference."""
    from detectron2.utils.events import EventStorage

    row = {"model": name, "executor": executor, "precision": precision}
    reason = unsupported(device, precision)
    if reason:
        return dict(row, status=reason)
    if executor is not None:
        apply_executor(model, executor)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    train_batch = det_inputs(s.det_batch, s.det_size, device, 0)
    test_batch = det_inputs(1, s.det_size, device, 1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            losses = model(train_batch)
        loss = sum(v.float() for v in losses.values())
        backward_and_step(loss, opt, scaler)

    def infer():
        model.eval()
        with torch.no_grad(), autocast(device, precision):
            model(test_batch)

    try:
        with EventStorage(0):  # detectron2 logs training statistics into one
            t_train, raw_train, mem_train = timed(train, device, s.warmup, s.repeats)
            t_infer, raw_infer, mem_infer = timed(infer, device, s.warmup, s.repeats)
            g_train, b_train = count_work(train) if s.count_work else (None, None)
            g_infer, b_infer = count_work(infer) if s.count_work else (None, None)
    except Exception as exc:  # noqa: BLE001
        return dict(row, status=f"error: {type(exc).__name__}: {exc}"[:300], params_m=rnd(params))
    finally:
        opt.zero_grad(set_to_none=True)  # free the gradients before the next model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(
        row, status="ok", params_m=rnd(params),
        train_ms_iter=rnd(t_train * 1e3), train_times_ms=raw_train, train_peak_mem_mb=rnd(mem_train, 1),
        infer_ms_image=rnd(t_infer * 1e3), infer_times_ms=raw_infer, infer_peak_mem_mb=rnd(mem_infer, 1),
        **work_fields("train", g_train, b_train, t_train),
        **work_fields("infer", g_infer, b_infer, t_infer),
    )


def run_detection(s, device, log):
    """Every detection row of ``s``; a missing baseline config is a row that says so."""
    from detectron2.modeling import build_model

    from .report import det_line

    rows = []
    for name, cfg, executors, why in detection_cfgs(s, device):
        if cfg is None:  # the baseline's config is missing: say so in its row, measure the rest
            for precision in s.precisions:
                rows.append({"model": name, "executor": None, "precision": precision, "status": why})
                log(det_line(rows[-1]))
            continue
        torch.manual_seed(0)
        model = build_model(cfg)
        if s.channels_last:
            model.to(memory_format=torch.channels_last)
        for executor in executors:
            for precision in s.precisions:
                row = bench_detector(name, model, executor, precision, s, device)
                rows.append(row)
                log(det_line(row))
        del model
        gc.collect()
    return rows
