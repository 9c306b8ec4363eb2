"""Which executor trains fastest on this device: the demo's training step, lean vs reference.

``MODEL.RANDWIRE.EXECUTOR auto`` (the default) runs lean on CUDA, where a step pays for the
bytes it moves (``randwire_d2.cost``), and the reference on a CPU, which is compute-bound
and pays for lean's recomputation instead. This measures the CPU half of that choice: one
model, one optimizer, the same batches, executors timed in alternating rounds in one
process (so drift of a shared machine hits both), median seconds per iteration.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from .classification import apply_executor
from .report import run_record, write_json

__all__ = ["DEMO_CONFIG", "time_executors"]

DEMO_CONFIG = os.path.join("configs", "demo", "randwire_frcnn_demo.yaml")


def _demo_step(config_file: str, opts, batches: int):
    """(model, a training step on batch i, number of batches) of ``config_file``'s detector."""
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    from ..engine import setup_cfg

    cfg = setup_cfg(config_file, ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)
    loader = iter(build_detection_train_loader(cfg))
    data = [next(loader) for _ in range(batches)]

    def step(i):
        loss = sum(model(data[i]).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def time_executors(config_file: str = DEMO_CONFIG, *, opts=(), executors=("lean", "reference"), batches: int = 6,
                   rounds: int = 3, threads=None, json_path=None, command="", date=None, log=print):
    """Median s/it of ``config_file``'s training step per executor on this CPU; returns the result."""
    from detectron2.utils.events import EventStorage

    if threads:
        torch.set_num_threads(threads)
    times = {e: [] for e in executors}
    with EventStorage(0):  # detectron2's heads log into it during training
        model, step = _demo_step(config_file, list(opts), batches)
        for e in executors:  # warm-up: allocator, first-call overheads
            apply_executor(model, e)
            step(0)
        for r in range(rounds):
            for e in executors if r % 2 == 0 else executors[::-1]:
                apply_executor(model, e)
                start = time.perf_counter()
                for i in range(batches):
                    step(i)
                times[e].append((time.perf_counter() - start) / batches)
    rows = [{"executor": e, "s_per_it": round(statistics.median(t), 4), "rounds_s_per_it": [round(x, 4) for x in t]}
            for e, t in times.items()]
    fastest = min(rows, key=lambda r: r["s_per_it"])["executor"]
    for r in rows:
        log(f"{r['executor']:>10}: {r['s_per_it']:.3f} s/it  (rounds {r['rounds_s_per_it']})")
    log(f"fastest on this CPU: {fastest}")
    result = {
        **run_record(command, "cpu", date), "what": "executor timing (training step, s/it, median of rounds)",
        "config": config_file, "opts": list(opts), "batches": batches, "rounds": rounds,
        "rows": rows, "fastest": fastest,
    }
    if json_path:
        write_json(result, json_path)
    return result
