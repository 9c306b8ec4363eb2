"""Timing, peak memory and work counting shared by every benchmark row."""
from __future__ import annotations

import gc
import statistics
import time
from contextlib import nullcontext

import torch

__all__ = [
    "DTYPES", "PeakMemory", "autocast", "backward_and_step", "count_work", "memory_kind",
    "rate", "rnd", "sync", "timed", "unsupported", "work_fields",
]

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, precision):
    """torch.autocast for "bf16"/"fp16", nothing for "fp32"."""
    dtype = DTYPES[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def unsupported(device, precision):
    """Why ``precision`` cannot run on ``device`` (a row's status), or None."""
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
    sync(device)
    times = []
    with PeakMemory(device) as pm:
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times), [round(t * 1e3, 3) for t in times], pm.mb


def count_work(fn):
    """(GFLOP, GB moved) of one call of ``fn``."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..cost import ByteCounter

    counter = ByteCounter()
    flops = FlopCounterMode(display=False)
    with flops, counter:
        fn()
    return flops.get_total_flops() / 1e9, counter.bytes / 1e9


def rate(amount, seconds):
    return None if amount is None or not seconds else amount / seconds


def rnd(x, nd=3):
    """``x`` rounded to ``nd`` decimals, None kept."""
    return None if x is None else round(float(x), nd)


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
    tflops = rate(gflop, seconds)
    return {
        f"{prefix}_gflop": rnd(gflop), f"{prefix}_gbytes": rnd(gbytes),
        f"{prefix}_achieved_tflops": rnd(tflops and tflops / 1e3, 4),
        f"{prefix}_achieved_gbs": rnd(rate(gbytes, seconds), 2),
    }
