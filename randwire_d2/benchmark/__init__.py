"""Benchmarks of RandWire against ResNet-50 (classification) and R50-FPN (detection).

``tools/benchmark.py`` and ``tools/benchmark_loader.py`` are their command lines; the
measurements live here so they can be imported and tested. :func:`run_benchmark` is the
speed/memory run (fields in ``tools/benchmark.py``'s docstring).
"""
from __future__ import annotations

import torch

from .classification import run_classification
from .detection import run_detection
from .measure import memory_kind
from .report import CLS_HEADER, DET_HEADER, ratios, run_record, write_json
from .settings import PRESETS, Settings

__all__ = ["PRESETS", "Settings", "run_benchmark"]


def run_benchmark(s: Settings, *, command: str, date=None, json_path=None, log=print):
    """Run the classification and detection rows of ``s`` (resolved); return the result dict."""
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    import randwire_d2  # noqa: F401  (registers the backbones)

    result = {
        **run_record(command, device, date),
        "settings": {
            "tiny": s.tiny, "batch": s.batch, "image_size": s.image_size,
            "det_batch": s.det_batch, "det_size": list(s.det_size), "warmup": s.warmup,
            "repeats": s.repeats, "precisions": s.precisions, "executors": s.executors,
            "channels_last": s.channels_last, "compile": s.compile, "cost_batch": s.cost_batch,
            "cost_only": s.cost_only, "drop_path": s.drop_path,
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
    if not s.skip_classification:
        log(f"# classification: batch {s.batch}, {s.image_size} px")
        if not s.cost_only:
            log(CLS_HEADER)
        result["classification"] = run_classification(s, device, log)
    if not s.skip_detection and not s.cost_only:
        log(f"# detection: train {s.det_batch} x {s.det_size[0]}x{s.det_size[1]}, infer 1 image")
        log(DET_HEADER)
        result["detection"] = run_detection(s, device, log)
    result["ratios"] = ratios(result["classification"], result["detection"])
    for r in result["ratios"]:
        log(f"ratio {r['what']} [{r['executor']}, {r['precision']}]: {r['ratio']}")
    if json_path:
        write_json(result, json_path)
        log(f"# wrote {json_path}")
    return result
