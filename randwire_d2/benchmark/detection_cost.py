"""Device-independent cost of a Faster R-CNN FPN training step: RandWire-FPN vs R50-FPN.

One training step (forward, losses, backward, SGD update) of each detector on the same
images in the same process, counted by :func:`randwire_d2.cost.training_cost`: activations
kept for backward, bytes moved and non-view ATen ops, and their ratios RandWire / R50.

Both detectors as configured for COCO: RandWire-FPN from ``configs/randwire_frcnn.yaml``
(C=109, FrozenBN, FREEZE_AT 2, its RPN/ROI heads), R50-FPN from detectron2's
``COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml`` (FrozenBN, FREEZE_AT 2), no weights.

``regions`` splits the bytes moved into the bottom-up network, the FPN and the rest (input
normalisation, RPN, ROI heads) by difference of three steps: the bottom-up network alone,
the backbone (bottom-up + FPN), the whole detector. The partial steps end in the mean of
their outputs, whose few extra bytes (a read of each output and its gradient) are
attributed to the bottom-up network and the FPN.
"""
from __future__ import annotations

import gc
import os

import torch

from .classification import apply_executor
from .detection import RANDWIRE_FPN_CONFIG, det_inputs, detection_cfgs
from .measure import rnd
from .settings import Settings

__all__ = ["detection_cost", "detector_cost"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COST_KEYS = ("saved_mb_per_img", "traffic_mb_per_img", "traffic_fwd_bwd_mb_per_img", "ops_per_step")


def _rounded(cost):
    return {k: cost[k] if k == "ops_per_step" else rnd(cost[k], 2) for k in COST_KEYS}


def _feature_mean_loss(features):
    return sum(f.float().mean() for f in features.values())


def detector_cost(model, batch, *, regions: bool = True):
    """Cost fields of one training step of a detectron2 ``model`` on ``batch`` (and ``regions``)."""
    from detectron2.utils.events import EventStorage

    from ..cost import training_cost

    n = len(batch)
    with EventStorage(0):
        row = training_cost(model, batch, lambda losses: sum(v.float() for v in losses.values()), batch=n)
        if not regions:
            return _rounded(row)
        with torch.no_grad():
            images = model.preprocess_image(batch).tensor
        bottom_up = training_cost(model.backbone.bottom_up, images, _feature_mean_loss, batch=n)
        backbone = training_cost(model.backbone, images, _feature_mean_loss, batch=n)
    out = _rounded(row)
    key = "traffic_mb_per_img"
    out["regions"] = {
        f"{key} bottom_up": rnd(bottom_up[key], 2),
        f"{key} fpn": rnd(backbone[key] - bottom_up[key], 2),
        f"{key} rpn+roi_heads+rest": rnd(row[key] - backbone[key], 2),
        "saved_mb_per_img bottom_up": rnd(bottom_up["saved_mb_per_img"], 2),
        "saved_mb_per_img fpn": rnd(backbone["saved_mb_per_img"] - bottom_up["saved_mb_per_img"], 2),
        "ops_per_step bottom_up": bottom_up["ops_per_step"],
        "ops_per_step fpn": backbone["ops_per_step"] - bottom_up["ops_per_step"],
    }
    return out


def detection_cost(*, images: int = 2, size=(800, 1216), tiny: bool = False, regions: bool = True,
                   device: str = "cpu", randwire_config=None, log=print):
    """{"settings", "rows", "ratios"}: the cost of a training step of each detector, fp32, eager."""
    from detectron2.modeling import build_model

    import randwire_d2  # noqa: F401  (registers the backbone)

    dev = torch.device(device)
    s = Settings(device=device, tiny=tiny, executors=["lean"])
    rows = []
    for name, cfg, _, why in detection_cfgs(s, dev, randwire_opts=(), randwire_config=randwire_config):
        if cfg is None:
            rows.append({"model": name, "status": why})
            continue
        torch.manual_seed(0)
        model = build_model(cfg)
        if name == "randwire-fpn":  # what a GPU runs ("auto" would run the reference on a CPU)
            apply_executor(model, "lean")
        batch = det_inputs(images, size, dev, 0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        row = {"model": name, "status": "ok", "params_m": rnd(sum(p.numel() for p in model.parameters()) / 1e6),
               "trainable_params_m": rnd(trainable),
               "norm": cfg.MODEL.RANDWIRE.NORM if name == "randwire-fpn" else cfg.MODEL.RESNETS.NORM,
               "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
               **detector_cost(model, batch, regions=regions)}
        if name == "randwire-fpn":
            row.update(channels=cfg.MODEL.RANDWIRE.CHANNELS, nodes=cfg.MODEL.RANDWIRE.NODES, executor="lean")
        rows.append(row)
        log(f"# detection cost {name}: {row}")
        del model, batch
        gc.collect()
    by = {r["model"]: r for r in rows if r.get("status") == "ok"}
    ratios = []
    if {"randwire-fpn", "r50-fpn"} <= set(by):
        rw, r50 = by["randwire-fpn"], by["r50-fpn"]
        for key in COST_KEYS:
            ratios.append({"what": f"detection {key} randwire-fpn / r50-fpn", "randwire": rw[key],
                           "baseline": r50[key], "ratio": rnd(rw[key] / r50[key])})
    return {"settings": {"images": images, "size": list(size), "tiny": tiny, "precision": "fp32",
                         "device": device, "regions": regions,
                         "randwire_config": os.path.relpath(randwire_config or RANDWIRE_FPN_CONFIG, REPO)},
            "rows": rows, "ratios": ratios}


def run_detection_cost(*, command: str, images: int, size, tiny: bool, regions: bool = True, date=None,
                       randwire_config=None, json_path=None, log=print):
    """:func:`detection_cost` with the run's date, command, device and versions; written to ``json_path``."""
    from .report import run_record, write_json

    result = run_record(command, "cpu", date)
    result.update(detection_cost(images=images, size=size, tiny=tiny, regions=regions,
                                 randwire_config=randwire_config, log=log))
    for r in result["ratios"]:
        log(f"ratio {r['what']}: {r['ratio']}")
    if json_path:
        write_json(result, json_path)
        log(f"# wrote {json_path}")
    return result
