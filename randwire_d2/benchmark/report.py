"""What a run prints and writes: table lines, ratios, device and versions, the JSON file."""
from __future__ import annotations

import json
import os
import platform

import torch

from .measure import rnd

__all__ = ["CLS_HEADER", "DET_HEADER", "cls_line", "det_line", "device_info", "ratios", "run_record", "versions",
           "write_json"]


def _fmt(v, width, nd=1):
    return f"{'-' if v is None else (f'{v:.{nd}f}' if isinstance(v, float) else v):>{width}}"


def _row_line(r, train_key, infer_key):
    head = f"{r['model']:22s} {str(r['executor'] or '-'):9s} {r['precision']:5s}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}"
    return (f"{head} {_fmt(r[train_key], 10)} {_fmt(r[infer_key], 10)} "
            f"{_fmt(r['train_peak_mem_mb'], 10)} {_fmt(r['infer_peak_mem_mb'], 10)} "
            f"{_fmt(r['train_achieved_gbs'], 8)} {_fmt(r['train_achieved_tflops'], 8, 3)}")


def cls_line(r):
    return _row_line(r, "train_img_s", "infer_img_s")


def det_line(r):
    return _row_line(r, "train_ms_iter", "infer_ms_image")


CLS_HEADER = (f"{'classification':22s} {'executor':9s} {'prec':5s} {'train img/s':>10s} "
              f"{'infer img/s':>10s} {'train MB':>10s} {'infer MB':>10s} {'trainGB/s':>8s} {'trainTF/s':>8s}")
DET_HEADER = (f"{'detection':22s} {'executor':9s} {'prec':5s} {'train ms/it':>10s} "
              f"{'infer ms/im':>10s} {'train MB':>10s} {'infer MB':>10s} {'trainGB/s':>8s} {'trainTF/s':>8s}")


def ratios(cls_rows, det_rows):
    """RandWire / baseline for training speed, the cost model and detection time and memory."""
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
                    "ratio": rnd(r["train_img_s"] / b["train_img_s"])})
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
                            "ratio": rnd(r[field] / b[field])})
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
                            "ratio": rnd(r[key] / b[key])})
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


def write_json(result, path):
    """Write ``result`` to ``path`` atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def run_record(command: str, device, date=None) -> dict:
    """What every benchmark JSON starts with: schema, date (``date`` or now), the command,
    the device (with torch's thread count) and the versions."""
    import datetime

    return {"schema": 1, "date": date or datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command, "device": device_info(torch.device(device), torch.get_num_threads()),
            "versions": versions()}
