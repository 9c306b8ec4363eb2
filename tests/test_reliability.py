"""Reliability: distributed (gloo on CPU) equivalence, exact resume after SIGKILL,
checkpoint integrity, hostile input.

Select with ``-k "resume or distributed or mismatch or corrupt or fuzz"``. Everything runs
on CPU with tiny models (C=16, N=10, 64 px images) and a few iterations.
"""
import errno
import importlib
import io
import re
import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils import comm

from conftest import REPO, tiny_detection_cfg

from randwire_d2.engine.launch import shutdown_process_group  # noqa: E402
from randwire_d2 import engine  # noqa: E402
from randwire_d2.checkpoint import GRAPHS_KEY, RandWireCheckpointer, graph_specs_of, read_graph_specs  # noqa: E402
from randwire_d2.data.classification import register_image_folder  # noqa: E402
from randwire_d2.data.demo import ensure_demo_dataset, register_demo_datasets  # noqa: E402
from randwire_d2.data.validation import DataError, SafeDatasetMapper, sanitize_detection_dicts  # noqa: E402
from randwire_d2.data import resumable  # noqa: E402
from randwire_d2.data.resumable import GlobalBatchStream, _RankBatches  # noqa: E402
from randwire_d2.engine import train_net  # noqa: E402
from randwire_d2.engine import (  # noqa: E402
    Trainer,
    check_run_settings,
    load_detection_train_dicts,
    setup_cfg,
)

DET_TRAIN, DET_VAL = "rel_det_train", "rel_det_val"
CLS_TRAIN, CLS_VAL = "rel_cls_train", "rel_cls_val"


def is_timing_key(key: str) -> bool:
    """Wall-clock scalars, which differ run to run: ``time``, ``data_time``, ``eta_seconds``,
    and any later ones by the same naming (HEAD added ``rank_data_time``)."""
    return key.endswith("time") or "_time" in key or key.startswith("eta_")

RUNNER = '''
import os, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, os.path.join({repo!r}, "tools"))
import randwire_d2  # noqa
from randwire_d2.data.classification import register_image_folder
from randwire_d2.data.demo import register_demo_datasets
register_demo_datasets(root={demo!r}, names=({det_train!r}, {det_val!r}), num_train=8, num_val=2)
register_image_folder({cls_train!r}, {cls_train_root!r})
register_image_folder({cls_val!r}, {cls_val_root!r})
import train_net
if __name__ == "__main__":
    train_net.run(train_net.argument_parser().parse_args())
'''


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_data")
    demo = str(root / "demo")
    ensure_demo_dataset(demo, num_train=8, num_val=2)
    register_demo_datasets(root=demo, names=(DET_TRAIN, DET_VAL), num_train=8, num_val=2)
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for label, cls in enumerate(("dark", "bright")):
            d = root / "cls" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                base = 40 + 150 * label
                px = np.clip(base + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
    register_image_folder(CLS_TRAIN, str(root / "cls" / "train"))
    register_image_folder(CLS_VAL, str(root / "cls" / "val"))
    runner = root / "runner.py"
    runner.write_text(RUNNER.format(
        repo=REPO, demo=demo, det_train=DET_TRAIN, det_val=DET_VAL, cls_train=CLS_TRAIN, cls_val=CLS_VAL,
        cls_train_root=str(root / "cls" / "train"), cls_val_root=str(root / "cls" / "val"),
    ))
    return {"root": root, "runner": str(runner)}


def det_opts(out, max_iter=6, period=100, **extra):
    """Tiny Faster R-CNN whose losses do not depend on how a global batch is split over
    processes: fixed-size inputs (64 px, padded to 64x64), every labelled anchor and every
    proposal sampled (no random subsets), fixed loss normalisers, batch-synchronised BN."""
    opts = {
        "MODEL.WEIGHTS": "", "MODEL.DEVICE": "cpu",
        "MODEL.RANDWIRE.CHANNELS": 16, "MODEL.RANDWIRE.NODES": 10, "MODEL.RANDWIRE.NORM": "naiveSyncBN",
        "MODEL.BACKBONE.FREEZE_AT": 0, "MODEL.FPN.OUT_CHANNELS": 32, "MODEL.ROI_BOX_HEAD.FC_DIM": 64,
        "MODEL.ROI_HEADS.NUM_CLASSES": 5, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 32,
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 100000, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
        "MODEL.ROI_HEADS.POSITIVE_FRACTION": 1.0, "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": False,
        "INPUT.MIN_SIZE_TRAIN": (64,), "INPUT.MAX_SIZE_TRAIN": 64, "INPUT.MIN_SIZE_TEST": 64,
        "INPUT.MAX_SIZE_TEST": 64, "DATASETS.TRAIN": (DET_TRAIN,), "DATASETS.TEST": (DET_VAL,),
        "SOLVER.IMS_PER_BATCH": 4, "SOLVER.BASE_LR": 0.01, "SOLVER.WARMUP_ITERS": 2,
        "SOLVER.STEPS": (max(1, max_iter - 2),), "SOLVER.MAX_ITER": max_iter, "SOLVER.CHECKPOINT_PERIOD": period,
        "SOLVER.AMP.ENABLED": False, "DATALOADER.NUM_WORKERS": 0, "SEED": 0, "CUDNN_BENCHMARK": False,
        "OUTPUT_DIR": str(out),
    }
    opts.update(extra)
    return "configs/randwire_frcnn.yaml", opts


def cls_opts(out, max_iter=6, period=100, **extra):
    opts = {
        "MODEL.DEVICE": "cpu", "MODEL.RANDWIRE.CHANNELS": 8, "MODEL.RANDWIRE.NODES": 6,
        "MODEL.RANDWIRE.NUM_CLASSES": 2, "MODEL.RANDWIRE.HEAD_CHANNELS": 32, "MODEL.RANDWIRE.NORM": "naiveSyncBN",
        "INPUT.CROP_SIZE": 16, "INPUT.RESIZE_SIZE": 16, "INPUT.CLS_PAD": 2,
        "DATASETS.TRAIN": (CLS_TRAIN,), "DATASETS.TEST": (CLS_VAL,),
        "SOLVER.EPOCHS": 0.0, "SOLVER.WARMUP_EPOCHS": 0.0, "SOLVER.LR_PER_256": 0.0, "SOLVER.BASE_LR": 0.05,
        "SOLVER.IMS_PER_BATCH": 4, "SOLVER.MAX_ITER": max_iter, "SOLVER.WARMUP_ITERS": 2,
        "SOLVER.CHECKPOINT_PERIOD": period, "TEST.IMS_PER_BATCH": 4,
        "DATALOADER.NUM_WORKERS": 0, "SEED": 0, "OUTPUT_DIR": str(out),
    }
    opts.update(extra)
    return "configs/fashion_mnist/randwire_tiny.yaml", opts


def _argv(config, opts, *flags):
    argv = ["--config-file", os.path.join(REPO, config), *flags]
    for k, v in opts.items():
        argv += [k, v if isinstance(v, str) else repr(v)]
    return argv


def _popen(data, config, opts, *flags, **popen_kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = open(os.path.join(opts["OUTPUT_DIR"] + ".log"), "w")
    os.makedirs(opts["OUTPUT_DIR"], exist_ok=True)
    return subprocess.Popen(
        [sys.executable, data["runner"], *_argv(config, opts, *flags)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, **popen_kwargs,
    )


def _wait(proc, opts, timeout=240):
    rc = proc.wait(timeout=timeout)
    if rc != 0:
        with open(opts["OUTPUT_DIR"] + ".log") as f:
            tail = f.read()[-4000:]
        raise AssertionError(f"run failed (rc={rc}):\n{tail}")


def _run_in_process(config, opts, *flags):
    args = train_net.argument_parser().parse_args(_argv(config, opts, *flags))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_net.main(args)
    finally:
        torch.set_num_threads(threads)


def _child(target, args):
    torch.set_num_threads(1)  # as in DataLoader workers: forked children stay single-threaded
    target(*args)


def _fork(target, *args):
    """A training process forked from this one: no second import of torch/detectron2."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(target, args))
    proc.start()
    return proc


def _main_from_argv(argv):
    train_net.main(train_net.argument_parser().parse_args(argv))


def _weights(out, name="model_final.pth"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=False)["model"]


def _train_metrics(out):
    """metrics.json lines by iteration (last write wins), without timings."""
    rows = {}
    with open(os.path.join(out, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            rows[row["iteration"]] = {k: v for k, v in row.items() if not is_timing_key(k)}
    return rows


def test_timing_rule_drops_every_clock_scalar_and_keeps_metrics():
    # v0.6 and HEAD metrics.json keys: the comparison must not depend on today's list
    keys = ["time", "data_time", "rank_data_time", "eta_seconds", "total_loss", "loss_cls",
            "loss_rpn_loc", "lr", "iteration", "fast_rcnn/cls_accuracy", "roi_head/num_fg_samples"]
    assert [k for k in keys if not is_timing_key(k)] == keys[4:]


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


# --------------------------------------------------------------------------- data streams
def _identity_mapper(d):
    return (d["i"], float(np.random.rand()))


def _stream_batches(world, workers, n_batches, monkeypatch, start_iter=0, grouped=False, total=4):
    """Global batches as seen by `world` processes with `workers` loader workers each
    (workers simulated in order, interleaved round-robin like torch's DataLoader)."""
    dicts = [{"i": i, "width": 10 + (i % 3), "height": 11} for i in range(10)]
    buckets = np.array([0 if d["width"] > d["height"] else 1 for d in dicts]) if grouped else None
    stream = GlobalBatchStream(len(dicts), seed=7, total_batch_size=total, buckets=buckets)
    per_rank = []
    for rank in range(world):
        ds = _RankBatches(dicts, _identity_mapper, stream, start_iter, rank, world, list)
        its = []
        for w in range(max(workers, 1)):
            info = type("I", (), {"id": w, "num_workers": workers})() if workers else None
            monkeypatch.setattr(resumable.torchdata, "get_worker_info", lambda info=info: info)
            its.append(list(_take(iter(ds), n_batches)))  # generators read worker info lazily
        per_rank.append([its[j % len(its)][j // len(its)] for j in range(n_batches)])
    return [sum((per_rank[r][j] for r in range(world)), []) for j in range(n_batches)]


def _take(it, n):
    for _ in range(n):
        yield next(it)


def _take_all(it, n):
    return [next(it) for _ in range(n)]


def test_distributed_global_batches_do_not_depend_on_processes_or_workers(monkeypatch):
    ref = _stream_batches(1, 0, 8, monkeypatch)
    assert len({i for b in ref[:2] for i, _ in b}) == 8  # an epoch-like shuffle, not repeats
    for world, workers in [(2, 0), (4, 0), (2, 3), (1, 2)]:
        assert _stream_batches(world, workers, 8, monkeypatch) == ref, (world, workers)
    grouped = _stream_batches(1, 0, 6, monkeypatch, grouped=True)
    assert _stream_batches(2, 2, 6, monkeypatch, grouped=True) == grouped
    for batch in grouped:  # one aspect bucket per global batch
        assert len({i % 3 == 2 for i, _ in batch}) == 1


def test_resume_stream_restarts_at_any_iteration(monkeypatch):
    for grouped in (False, True):
        full = _stream_batches(2, 0, 9, monkeypatch, grouped=grouped)
        assert _stream_batches(2, 0, 4, monkeypatch, start_iter=5, grouped=grouped) == full[5:]
        assert _stream_batches(2, 2, 3, monkeypatch, start_iter=3, grouped=grouped) == full[3:6]


def test_distributed_detectron2_sampler_shards_one_global_stream(monkeypatch):
    """detectron2's TrainingSampler (seeded) gives rank r every world-th index of one
    stream; with per-rank batches of B/world and no loader workers, the union over ranks
    of batch i is exactly batch i of a 1-process run."""
    from detectron2.data import samplers
    from detectron2.data.samplers import distributed_sampler

    def stream(rank, world, per_rank, n):
        monkeypatch.setattr(distributed_sampler.comm, "get_rank", lambda: rank)
        monkeypatch.setattr(distributed_sampler.comm, "get_world_size", lambda: world)
        it = iter(samplers.TrainingSampler(10, seed=3))
        return [[next(it) for _ in range(per_rank)] for _ in range(n)]

    one = stream(0, 1, 4, 6)
    two = [stream(r, 2, 2, 6) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*two)] == [sorted(b) for b in one]


def test_distributed_stream_with_real_loader_workers(data):
    """The same global batches through torch's DataLoader with 0 and 2 worker processes."""
    cfg = setup_cfg(*_cfg_args(*cls_opts(data["root"] / "unused")))
    cfg.freeze()
    batches = []
    for workers in (0, 2):
        cfg2 = cfg.clone()
        cfg2.defrost()
        cfg2.DATALOADER.NUM_WORKERS = workers
        loader = Trainer.build_train_loader(cfg2)
        loader.start_iter = 2
        got = _take_all(iter(loader), 3)
        batches.append([[(d["file_name"], d["image"].sum().item()) for d in b] for b in got])
    assert batches[0] == batches[1]


def _cfg_args(config, opts):
    return os.path.join(REPO, config), [x for kv in opts.items() for x in kv]


# --------------------------------------------------------------------------- exact resume
def _kill_after_first_checkpoint(proc, out, timeout=180):
    first = os.path.join(out, "last_checkpoint")
    deadline = time.time() + timeout
    while not os.path.exists(first):
        assert proc.exitcode is None, f"the run ended (exit code {proc.exitcode}) before writing a checkpoint"
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "model_final.pth")), "killed too late: make MAX_ITER larger"


@pytest.mark.parametrize("task", ["detection", "pretraining"])
def test_resume_after_sigkill_matches_uninterrupted_run(data, tmp_path, task):
    """A training process SIGKILLed after its first checkpoint, resumed with --resume, ends
    with bit-identical weights, logged training metrics and evaluation results."""
    make = det_opts if task == "detection" else cls_opts
    extra = {"MODEL.RANDWIRE.DROP_PATH": 0.1}  # model randomness must resume too
    if task == "pretraining":
        extra.update({"MODEL.RANDWIRE.DROPOUT": 0.2, "DATALOADER.NUM_WORKERS": 2})
    config, ref = make(tmp_path / "uninterrupted", max_iter=12, period=3, **extra)
    _, run = make(tmp_path / "killed", max_iter=12, period=3, **extra)
    victim = _fork(_main_from_argv, _argv(config, run))
    _kill_after_first_checkpoint(victim, run["OUTPUT_DIR"])
    _run_in_process(config, ref)  # the uninterrupted reference
    with open(os.path.join(run["OUTPUT_DIR"], "last_checkpoint")) as f:
        resumed_from = f.read().strip()
    start_iter = int(resumed_from[len("model_"):-len(".pth")]) + 1
    trainer_start = []
    original = Trainer.resume_or_load

    def spy(self, resume=True):
        original(self, resume=resume)
        trainer_start.append((self.start_iter, self._trainer.data_loader.start_iter))

    Trainer.resume_or_load = spy
    try:
        _run_in_process(config, run, "--resume")
    finally:
        Trainer.resume_or_load = original
    assert trainer_start == [(start_iter, start_iter)]
    assert not [f for f in os.listdir(run["OUTPUT_DIR"]) if ".tmp" in f]

    a, b = _weights(ref["OUTPUT_DIR"]), _weights(run["OUTPUT_DIR"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{task}: {k} differs after resume"
    # training metrics (window-smoothed losses, lr, ...) of the last iteration and the
    # final evaluation are the same as well
    ma, mb = _train_metrics(ref["OUTPUT_DIR"]), _train_metrics(run["OUTPUT_DIR"])
    assert _same(ma[11], mb[11]), (ma[11], mb[11])
    with open(os.path.join(ref["OUTPUT_DIR"], "final_metrics.json")) as f1, \
            open(os.path.join(run["OUTPUT_DIR"], "final_metrics.json")) as f2:
        r1, r2 = json.load(f1), json.load(f2)
    # each of its own final weights (whose files differ: timings in the saved metric history)
    assert [os.path.basename(r.pop("weights")["path"]) for r in (r1, r2)] == ["model_final.pth"] * 2
    assert _same(r1, r2)


# --------------------------------------------------------------------------- stop signals
STOPPED_LINE = r"^stopped by (SIG\w+) at iteration (\d+): checkpoint (\S+); continue with --resume$"


def _assert_equal_weights(a_dir, b_dir):
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def _assert_stopped_cleanly(out, iteration, max_iter):
    from randwire_d2.engine.output_dir import LOCK_NAME

    assert iteration < max_iter - 1, "stopped too late: make MAX_ITER larger"
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == f"model_{iteration:07d}.pth"
    saved = torch.load(os.path.join(out, f"model_{iteration:07d}.pth"), map_location="cpu", weights_only=False)
    assert saved["iteration"] == iteration and "_trainer" in saved["trainer"]  # exact-resume state
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    assert not [f for f in os.listdir(out) if ".tmp" in f]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, /proc")
def test_stop_sigterm_to_every_process_checkpoints_iteration_and_resume_is_bit_identical(data, tmp_path):
    """SIGTERM to every process of a 2-process CPU run with a loader worker per process (as
    SLURM and a terminal send it), then a second signal while it stops: it finishes the
    iteration, checkpoints it, releases the lock, prints one line, exits 143 and leaves no
    process behind; --resume ends bit-identical to an uninterrupted run."""
    extra = {"DATALOADER.NUM_WORKERS": 1, "MODEL.RANDWIRE.DROPOUT": 0.2, "MODEL.RANDWIRE.DROP_PATH": 0.1}
    config, ref = cls_opts(tmp_path / "ref", max_iter=20, period=3, **extra)
    _, run = cls_opts(tmp_path / "run", max_iter=20, period=3, **extra)
    out = run["OUTPUT_DIR"]
    victim = _popen(data, config, run, "--num-gpus", "2", start_new_session=True)
    try:
        _wait_for(lambda: os.path.exists(os.path.join(out, "last_checkpoint")) or victim.poll() is not None,
                  240, "the first checkpoint")
        os.killpg(victim.pid, signal.SIGTERM)
        time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGINT)  # a second signal while stopping changes nothing
        rc = victim.wait(timeout=120)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    log = open(out + ".log").read()
    stopped = [m for m in (re.match(STOPPED_LINE, line) for line in log.splitlines()) if m]
    assert rc == 128 + signal.SIGTERM and stopped, (rc, log[-3000:])
    name, iteration, path = stopped[-1].groups()
    iteration = int(iteration)
    assert name == "SIGTERM" and path == os.path.join(out, f"model_{iteration:07d}.pth"), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    _assert_stopped_cleanly(out, iteration, 20)

    def group_alive():
        try:
            os.killpg(victim.pid, 0)
        except ProcessLookupError:
            return False
        return True

    _wait_for(lambda: not group_alive(), 30, "every process of the stopped run to exit")

    # loader workers do not change the batches (test_distributed_global_batches_...): none from here on
    ref["DATALOADER.NUM_WORKERS"] = run["DATALOADER.NUM_WORKERS"] = 0
    reference = _popen(data, config, ref, "--num-gpus", "2")
    resumed = _popen(data, config, run, "--num-gpus", "2", "--resume")
    _wait(reference, ref)
    _wait(resumed, run)
    assert f"resumes at global batch {iteration + 1}" in open(os.path.join(out, "log.txt")).read()
    _assert_equal_weights(ref["OUTPUT_DIR"], out)


def test_stop_sigint_single_process_detection_resumes_bit_identical(data, tmp_path):
    """Ctrl-C (SIGINT) of a one-process detection run: RunStopped (exit code 130) naming the
    checkpoint of the finished iteration; --resume ends bit-identical."""
    import threading

    from randwire_d2.engine.preemption import RunStopped

    extra = {"MODEL.RANDWIRE.DROP_PATH": 0.1}
    config, ref = det_opts(tmp_path / "ref", max_iter=14, period=3, **extra)
    _, run = det_opts(tmp_path / "run", max_iter=14, period=3, **extra)
    out = run["OUTPUT_DIR"]

    def interrupt():
        _wait_for(lambda: os.path.exists(os.path.join(out, "last_checkpoint")), 240, "the first checkpoint")
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunStopped) as stop:
        _run_in_process(config, run)
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    assert stop.value.exit_code == 130 and stop.value.signal_name == "SIGINT"
    assert re.match(STOPPED_LINE, str(stop.value)), str(stop.value)
    assert stop.value.checkpoint == os.path.join(out, f"model_{stop.value.iteration:07d}.pth")
    _assert_stopped_cleanly(out, stop.value.iteration, 14)
    _run_in_process(config, ref)
    _run_in_process(config, run, "--resume")
    _assert_equal_weights(ref["OUTPUT_DIR"], out)


# --------------------------------------------------------------------------- distributed
def _assert_close_params(ref_state, other_state, model, atol, rtol=1e-3):
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers() if "running_mean" in n}
    worst = max(((ref_state[n] - other_state[n]).abs().max().item(), n) for n in names)
    for n in sorted(names):
        assert torch.allclose(ref_state[n], other_state[n], atol=atol, rtol=rtol), (n, worst)
    return worst


@pytest.mark.parametrize("task", ["detection", "classification"])
def test_distributed_two_cpu_processes_match_one(data, tmp_path, task):
    """2 gloo processes x 2 images == 1 process x 4 images (same global batches, naiveSyncBN,
    loss normalisers independent of the split). Also: DDP + naiveSyncBN on CPU works.

    Detection: two forked workers through randwire_d2.engine.launch's CPU worker (process group,
    detectron2's local group, DDP of a CPU model). Classification: the whole command line,
    ``tools/train_net.py --num-gpus 2 MODEL.DEVICE cpu`` (spawned workers)."""
    launch_mod = importlib.import_module("randwire_d2.engine.launch")  # the attribute is the function

    make = det_opts if task == "detection" else cls_opts
    # a moderate LR: at 0.05 the tiny classifier amplifies float rounding differences
    # (1e-8 after one step) to 1e-2 in four steps; at 0.01 they stay below 1e-6
    config, two = make(tmp_path / "two", max_iter=4, **{"SOLVER.BASE_LR": 0.01})
    _, one = make(tmp_path / "one", max_iter=4, **{"SOLVER.BASE_LR": 0.01})
    if task == "detection":
        argv = _argv(config, two, "--num-gpus", "2")
        url = f"file://{tmp_path / 'pg'}"
        args = default_argument_parser().parse_args(argv)
        workers = [
            _fork(launch_mod._cpu_worker, r, train_net.main, 2, 2, 0, url, (args,), timedelta(minutes=3))
            for r in range(2)
        ]
        _run_in_process(config, one)
        for w in workers:
            w.join(timeout=240)
            assert w.exitcode == 0, f"worker exit code {w.exitcode}"
    else:
        proc = _popen(data, config, two, "--num-gpus", "2")
        _run_in_process(config, one)
        _wait(proc, two)
    with open(os.path.join(two["OUTPUT_DIR"], "log.txt")) as f:
        assert "World size: 2" in f.read()
    cfg = setup_cfg(*_cfg_args(config, one))
    model = build_model(cfg)
    ref = _weights(one["OUTPUT_DIR"])
    worst = _assert_close_params(ref, _weights(two["OUTPUT_DIR"]), model, atol=1e-5)
    print(f"{task}: largest |1-proc - 2-proc| difference {worst[0]:.2e} ({worst[1]})")
    # training moved the weights (the comparison is not vacuous)
    start = model.state_dict()
    assert any(not torch.allclose(start[n], ref[n]) for n, _ in model.named_parameters())


def test_distributed_two_machines_match_two_processes_on_one(data, tmp_path):
    """Two launchers, ``--num-machines 2 --machine-rank 0/1`` with one CPU process each and the
    same tcp:// rendezvous (two machines, simulated on this one with a shared OUTPUT_DIR),
    train to the same weights, bit for bit, as one launcher with two processes."""
    extra = {"SOLVER.BASE_LR": 0.01, "MODEL.RANDWIRE.DROP_PATH": 0.1}
    config, two_machines = cls_opts(tmp_path / "machines", max_iter=4, **extra)
    _, one_machine = cls_opts(tmp_path / "processes", max_iter=4, **extra)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    machine_flags = ["--num-gpus", "1", "--num-machines", "2", "--dist-url", url]
    machine0 = _popen(data, config, two_machines, *machine_flags, "--machine-rank", "0")
    os.makedirs(tmp_path / "m1", exist_ok=True)
    machine1 = subprocess.Popen(
        [sys.executable, data["runner"], *_argv(config, two_machines, *machine_flags, "--machine-rank", "1")],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        stdout=open(tmp_path / "m1" / "log", "w"), stderr=subprocess.STDOUT,
    )
    reference = _popen(data, config, one_machine, "--num-gpus", "2")
    _wait(reference, one_machine)
    _wait(machine0, two_machines)
    rc = machine1.wait(timeout=240)
    assert rc == 0, open(tmp_path / "m1" / "log").read()[-3000:]
    log = open(os.path.join(two_machines["OUTPUT_DIR"], "log.txt")).read()
    assert "World size: 2" in log and "Rank of current process: 0" in log
    assert "Rank of current process: 1" in open(os.path.join(two_machines["OUTPUT_DIR"], "log.txt.rank1")).read()
    _assert_equal_weights(one_machine["OUTPUT_DIR"], two_machines["OUTPUT_DIR"])


def test_distributed_slurm_launcher_through_submitit_local_executor(data, tmp_path):
    """``--launcher slurm --gpus-per-node 2`` (submitit's local executor standing in for SLURM):
    one job of two tasks rendezvousing at the job's port trains to the same weights, bit for
    bit, as two local processes; submitit's logs are under OUTPUT_DIR, the lock is released."""
    pytest.importorskip("submitit")
    from randwire_d2.engine.output_dir import LOCK_NAME

    extra = {"SOLVER.BASE_LR": 0.01, "DATASETS.IMAGENET_ROOT": str(data["root"] / "cls"),  # registered in any process
             "DATASETS.TRAIN": ("imagenet_train",), "DATASETS.TEST": ("imagenet_val",)}
    config, slurm = cls_opts(tmp_path / "slurm", max_iter=4, **extra)
    _, local = cls_opts(tmp_path / "local", max_iter=4, **extra)
    reference = _popen(data, config, local, "--num-gpus", "2")
    args = train_net.argument_parser().parse_args(_argv(
        config, slurm, "--launcher", "slurm", "--submitit-cluster", "local", "--nodes", "1", "--gpus-per-node", "2",
        "--time", "10"))
    job = train_net.launch_from_args(args)
    job.results()  # one per task; raises with the task's error if one failed
    _wait(reference, local)
    _assert_equal_weights(local["OUTPUT_DIR"], slurm["OUTPUT_DIR"])
    assert "World size: 2" in open(os.path.join(slurm["OUTPUT_DIR"], "log.txt")).read()
    assert os.listdir(os.path.join(slurm["OUTPUT_DIR"], "submitit"))
    assert not os.path.exists(os.path.join(slurm["OUTPUT_DIR"], LOCK_NAME))


def test_lifecycle_slurm_requeue_resumes_the_same_training(tmp_path):
    """submitit calls checkpoint() before requeueing a preempted / timed-out job: the requeued
    job is the same training with --resume; every task derives the same rendezvous port."""
    pytest.importorskip("submitit")
    from randwire_d2.engine.slurm import DistributedTraining, job_port

    args = train_net.argument_parser().parse_args(["--config-file", "x.yaml", "--launcher", "slurm", "--overwrite"])
    job = DistributedTraining(os.path.join(REPO, "tools", "train_net.py"), args, False, str(tmp_path))
    delayed = job.checkpoint()
    requeued = delayed.function
    assert isinstance(requeued, DistributedTraining) and requeued.output_dir == str(tmp_path)
    assert requeued.args.resume and not requeued.args.overwrite and not args.resume  # the original is unchanged
    assert job_port("12345") == job_port("12345") and 20000 <= job_port("12345") < 40000
    assert job_port("12345") != job_port("12346")


def test_lifecycle_lock_of_the_same_slurm_job_is_taken_over_after_requeue(tmp_path, caplog):
    from randwire_d2.engine.output_dir import LOCK_NAME, OutputDirLock, RunLockError

    lock = tmp_path / LOCK_NAME
    with open(lock, "w") as f:  # the job's first run, on another node, preempted
        json.dump({"pid": 1234, "host": "node-a.example", "job_id": "4242", "since": 0}, f)
    with pytest.raises(RunLockError, match=r"locked by a run on another host \(pid 1234 on host node-a.example, "
                                           r"SLURM job 4242"):
        OutputDirLock(str(tmp_path), job_id="9999").acquire()
    with caplog.at_level("WARNING", logger="randwire_d2"):
        with OutputDirLock(str(tmp_path), job_id="4242") as taken:
            assert taken.read_owner()["job_id"] == "4242" and taken.read_owner()["pid"] == os.getpid()
    assert "earlier run of SLURM job 4242" in caplog.text and "requeued" in caplog.text
    assert not lock.exists()


def test_distributed_syncbn_on_cpu_is_refused_with_advice(monkeypatch):
    """torch's SyncBatchNorm is CUDA-only (it raises on CPU inputs in a process group):
    a multi-process CPU run with SyncBN is refused up front, naming the key and naiveSyncBN."""
    cfg = tiny_detection_cfg("configs/randwire_frcnn.yaml", "MODEL.RANDWIRE.NORM", "SyncBN")
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="MODEL.RANDWIRE.NORM.*naiveSyncBN"):
        check_run_settings(cfg)
    cfg.MODEL.RANDWIRE.NORM = "naiveSyncBN"
    check_run_settings(cfg)
    cfg.SOLVER.IMS_PER_BATCH = 3
    with pytest.raises(ValueError, match="IMS_PER_BATCH = 3 must be a positive multiple of the number of processes"):
        check_run_settings(cfg)


def test_distributed_torch_syncbn_needs_gpu(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        bn = torch.nn.SyncBatchNorm(4).train()
        with pytest.raises(ValueError, match="GPU"):
            bn(torch.randn(2, 4, 3, 3))
    finally:
        shutdown_process_group()


def test_distributed_launch_single_process_and_bad_args():
    from randwire_d2.engine.launch import launch

    assert launch(lambda x: x + 1, 1, args=(41,), device="cpu") == 42
    with pytest.raises(ValueError, match="dist-url"):
        launch(print, 2, num_machines=2, machine_rank=0, dist_url="auto", device="cpu")
    with pytest.raises(ValueError, match="machine_rank"):
        launch(print, 2, num_machines=2, machine_rank=2, dist_url="tcp://127.0.0.1:1", device="cpu")


# --------------------------------------------------------------------------- checkpoints
def _classifier(seed=0, generator="WS", graphs_file=""):
    cfg = setup_cfg(os.path.join(REPO, "configs/fashion_mnist/randwire_tiny.yaml"), [
        "MODEL.RANDWIRE.CHANNELS", 8, "MODEL.RANDWIRE.NODES", 6, "MODEL.RANDWIRE.HEAD_CHANNELS", 16,
        "MODEL.RANDWIRE.SEED", seed, "MODEL.RANDWIRE.GENERATOR", generator, "MODEL.RANDWIRE.ER_P", 0.4,
        "MODEL.RANDWIRE.BA_M", 2, "MODEL.RANDWIRE.GRAPHS_FILE", graphs_file,
    ])
    return build_model(cfg)


def test_checkpoint_with_legacy_ba_graphs_loads_through_graphs_file(tmp_path):
    """A BA model saved before the M-node start (spec version 1, networkx 3's star: one input
    node) is refused by today's BA model with the reason, and rebuilt exactly via GRAPHS_FILE."""
    import networkx as nx
    from randwire_d2.graphs import GraphSpec, specs_to_dict, stage_seed

    legacy = {}
    for name, n in (("res3", 6), ("res4", 6), ("res5", 6)):
        star = nx.barabasi_albert_graph(n, 2, seed=stage_seed(0, name))  # the old process
        legacy[name] = GraphSpec(
            num_nodes=n, edges=tuple(sorted(tuple(sorted(e)) for e in star.edges())),
            generator="BA", params=(("m", 2),), seed=stage_seed(0, name), version=1,
        ).to_dict()
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    old = _classifier(graphs_file=str(tmp_path / "legacy.json"))
    assert all(len(s.input_nodes) == 1 for s in graph_specs_of(old).values())
    RandWireCheckpointer(old, save_dir=str(tmp_path)).save("old")
    path = str(tmp_path / "old.pth")
    assert {s["version"] for s in torch.load(path, weights_only=False)[GRAPHS_KEY].values()} == {1}
    with pytest.raises(ValueError, match=r"star start(?s:.*)GRAPHS_FILE"):
        RandWireCheckpointer(_classifier(generator="BA")).load(path)
    assert all(len(s.input_nodes) == 2 for s in graph_specs_of(_classifier(generator="BA")).values())
    rebuilt = _classifier(generator="BA", graphs_file=path)
    RandWireCheckpointer(rebuilt).load(path)
    assert graph_specs_of(rebuilt) == graph_specs_of(old)
    for k, v in old.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k]), k


def test_mismatch_graphs_refused_naming_stage_and_rebuild(tmp_path):
    src = _classifier(seed=0)
    RandWireCheckpointer(src, save_dir=str(tmp_path)).save("model_a")
    path = str(tmp_path / "model_a.pth")
    for other in (_classifier(seed=1), _classifier(generator="ER")):
        with pytest.raises(ValueError) as err:
            RandWireCheckpointer(other).load(path)
        msg = str(err.value)
        assert "stage res3" in msg and f"MODEL.RANDWIRE.GRAPHS_FILE {path}" in msg, msg
    # a changed networkx stream: same seed and generator, one edge of res3 different
    specs = {k: v.to_dict() for k, v in graph_specs_of(src).items()}
    edges = specs["res3"]["edges"]
    specs["res3"]["edges"] = edges[:-1]
    specs["res3"].pop("content_hash")
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(specs))
    with pytest.raises(ValueError, match=r"stage res3(?s:.*)GRAPHS_FILE"):
        RandWireCheckpointer(_classifier(graphs_file=str(changed))).load(path)
    # following the advice rebuilds the checkpoint's own network, which then loads
    rebuilt = _classifier(seed=5, graphs_file=path)
    RandWireCheckpointer(rebuilt).load(path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k]), k
    # a checkpointer that refused one file still loads the next (HEAD keeps per-load state)
    same = _classifier(seed=0)
    checkpointer = RandWireCheckpointer(same)
    with pytest.raises(ValueError, match="stage res3"):
        checkpointer.load(_saved(_classifier(seed=1), tmp_path))
    checkpointer.load(path)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in src.state_dict().items())


def _saved(model, tmp_path):
    RandWireCheckpointer(model, save_dir=str(tmp_path)).save("model_b")
    return str(tmp_path / "model_b.pth")


def test_corrupt_save_crash_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = _classifier()
    ckpt = RandWireCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save("model_0000003")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no tmp, no partial
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert ckpt.resume_or_load("", resume=True) is not None  # loads the previous one
    # a temp file left by a SIGKILLed writer is cleaned up by the next save of that file
    (tmp_path / "model_0000003.pth.tmp.99999").write_bytes(b"partial")
    ckpt.save("model_0000003")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_0000003.pth"]


def test_corrupt_checkpoint_file_error_names_file(tmp_path):
    model = _classifier()
    ckpt = RandWireCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001")
    path = tmp_path / "model_0000001.pth"
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], b"not a checkpoint at all", b""):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=f"Cannot load checkpoint '{path}'"):
            RandWireCheckpointer(_classifier(), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    with pytest.raises(ValueError, match=str(path)):
        read_graph_specs(str(path))


def test_resume_checkpoint_carries_graphs_data_seed_and_history(data, tmp_path):
    config, opts = cls_opts(tmp_path / "out", max_iter=2, period=2, SEED=-1)
    _run_in_process(config, opts)
    ckpt = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=True)
    assert set(ckpt[GRAPHS_KEY]) == {"res3", "res4", "res5"}  # small regime: res2 is a conv
    hook = ckpt["trainer"]["hooks"]["ExactResumeHook"]
    assert isinstance(hook["data_seed"], int) and hook["data_seed"] >= 0  # SEED -1: a drawn seed, kept
    assert [it for _, it in hook["history"]["total_loss"]] == [0, 1]
    assert "_trainer" in ckpt["trainer"]  # optimizer state, also on detectron2 v0.6


def test_resume_from_checkpoint_without_optimizer_state(data, tmp_path, caplog):
    """Checkpoints written by plain detectron2 v0.6 trainers carry no '_trainer' entry:
    resuming restores iteration and hooks and says momentum restarts (HEAD would KeyError)."""
    config, opts = cls_opts(tmp_path / "out", max_iter=2, period=2, SEED=0)
    _run_in_process(config, opts)
    path = tmp_path / "out" / "model_final.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    del ckpt["trainer"]["_trainer"]
    torch.save(ckpt, path)
    config, opts = cls_opts(tmp_path / "out", max_iter=3, period=2, SEED=0)
    with caplog.at_level("WARNING", logger="randwire_d2"):
        _run_in_process(config, opts, "--resume")
    assert "momentum restarts" in caplog.text


# --------------------------------------------------------------------------- hostile input
def _coco(tmp_path, name, images, annotations, categories=({"id": 1, "name": "a"}, {"id": 2, "name": "b"})):
    img_dir = tmp_path / name
    img_dir.mkdir()
    recs = []
    for i, (fname, size) in enumerate(images, start=1):
        if size is not None:
            Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(img_dir / fname)
        recs.append({"id": i, "file_name": fname, "width": size[0] if size else 64, "height": size[1] if size else 48})
    anns = [dict(a, id=j, area=10.0, iscrowd=0) for j, a in enumerate(annotations, start=1)]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"images": recs, "annotations": anns, "categories": list(categories)}))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(path), str(img_dir))
    return name


def _det_cfg(name, *opts):
    return tiny_detection_cfg("configs/randwire_frcnn.yaml", "DATASETS.TRAIN", (name,), "MODEL.ROI_HEADS.NUM_CLASSES", 2,
                              "INPUT.MIN_SIZE_TRAIN", (48,), "INPUT.MAX_SIZE_TRAIN", 64, *opts)


def test_corrupt_annotations_bad_boxes_are_counted_and_logged(tmp_path, caplog):
    name = _coco(tmp_path, "rel_bad_boxes", [("a.png", (64, 48)), ("b.png", (64, 48)), ("c.png", (64, 48))], [
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]},
        {"image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 20]},  # degenerate
        {"image_id": 1, "category_id": 2, "bbox": [30, 5, -10, 20]},  # negative width
        {"image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 0]},  # degenerate: image left empty
        {"image_id": 3, "category_id": 2, "bbox": [1, 2, 30, 30]},
    ])
    cfg = _det_cfg(name)
    with caplog.at_level("WARNING", logger="randwire_d2.data.validation"):
        dicts = load_detection_train_dicts(cfg)
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["a.png", "c.png"]
    assert [len(d["annotations"]) for d in dicts] == [1, 1]
    text = caplog.text
    assert "Dropped 3 unusable boxes" in text and "negative width/height" in text and "a.png" in text
    assert "Removed 1 images" in text
    # direct use: counts returned, NaN boxes dropped too, input untouched
    recs = [{"file_name": "x.png", "annotations": [{"bbox": [0, 0, float("nan"), 4], "bbox_mode": 1, "category_id": 0}]},
            {"file_name": "y.png", "annotations": [{"bbox": [0, 0, 4, 4], "bbox_mode": 1, "category_id": 1}]}]
    kept, counts = sanitize_detection_dicts(recs, 2, check_files=False)
    assert kept == recs[1:] and counts["dropped_boxes"] == 1 and counts["removed_images"] == 1
    assert len(recs[0]["annotations"]) == 1


def test_corrupt_annotations_unknown_category_is_an_error_naming_file(tmp_path):
    name = _coco(tmp_path, "rel_bad_cat", [("a.png", (64, 48))], [{"image_id": 1, "category_id": 99, "bbox": [5, 5, 20, 20]}])
    with pytest.raises(DataError, match=r"rel_bad_cat\.json(?s:.*)category_id=99"):
        load_detection_train_dicts(_det_cfg(name))
    # contiguous ids registered by hand: out of range for the model
    good = str(tmp_path / "rel_bad_cat" / "a.png")
    if "rel_bad_cat2" in DatasetCatalog.list():
        DatasetCatalog.remove("rel_bad_cat2")
    DatasetCatalog.register("rel_bad_cat2", lambda: [{"file_name": good, "image_id": 7, "height": 48, "width": 64,
                                                      "annotations": [{"bbox": [1, 1, 9, 9], "bbox_mode": 0, "category_id": 2}]}])
    with pytest.raises(DataError, match=r"a\.png' \(image_id=7\).*category id 2 outside \[0, 2\)"):
        load_detection_train_dicts(_det_cfg("rel_bad_cat2"))


def test_corrupt_missing_or_unreadable_images_error_names_file(tmp_path):
    name = _coco(tmp_path, "rel_missing", [("a.png", (64, 48)), ("gone.png", None)], [
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]}, {"image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 20]}])
    with pytest.raises(DataError, match=r"1 image file\(s\) of dataset rel_missing do not exist, e\.g\. '.*gone\.png'"):
        load_detection_train_dicts(_det_cfg(name))

    cfg = _det_cfg(name)
    mapper = SafeDatasetMapper(cfg, True)
    good = tmp_path / "rel_missing" / "a.png"
    jpg = tmp_path / "ok.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(jpg, quality=95)
    (tmp_path / "truncated.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "dir.jpg").mkdir()
    for bad in ("truncated.jpg", "garbage.jpg", "empty.jpg", "dir.jpg", "absent.jpg"):
        rec = {"file_name": str(tmp_path / bad), "image_id": 3, "height": 48, "width": 64, "annotations": []}
        with pytest.raises(DataError, match=f"Cannot load image '{tmp_path / bad}' \\(image_id=3\\)"):
            mapper(rec)
    ok = mapper({"file_name": str(good), "image_id": 1, "height": 48, "width": 64, "annotations": []})
    assert ok["image"].shape[0] == 3
    # through the training loader and a worker process: the message survives
    os.remove(good)
    Image.open(jpg).save(good, format="PNG")
    good.write_bytes(good.read_bytes()[:60])
    cfg = _det_cfg(name, "DATALOADER.NUM_WORKERS", 1)
    dicts = [dict(d, file_name=str(good)) for d in DatasetCatalog.get(name)[:1]]
    loader = resumable.ResumableTrainLoader(dicts, mapper, total_batch_size=1, seed=0, num_workers=1)
    with pytest.raises(DataError, match=f"Cannot load image '{good}'"):
        next(iter(loader))


def test_corrupt_nonfinite_loss_stops_training_naming_iteration(data, tmp_path):
    from randwire_d2.engine.errors import TrainingError

    config, opts = cls_opts(tmp_path / "out", max_iter=6, period=1)
    args = default_argument_parser().parse_args(_argv(config, opts))
    cfg = engine.setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer._trainer.model
    forward = model.forward

    def nan_from_iteration_2(*a, **k):
        losses = forward(*a, **k)
        if trainer.iter >= 2:
            losses = {n: v * float("nan") for n, v in losses.items()}
        return losses

    model.forward = nan_from_iteration_2
    with pytest.raises(TrainingError, match=r"^training stopped at iteration 2: FloatingPointError: Loss became "
                                            r"infinite or NaN at iteration=2!.*\(last good checkpoint: .*model_0000001"
                                            r"\.pth\)$") as err:
        trainer.train()
    assert err.value.iteration == 2 and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")
    RandWireCheckpointer(build_model(cfg)).load(str(tmp_path / "out" / "model_0000001.pth"))  # intact


def test_corrupt_config_typos_and_bad_values():
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.RANDWIRE.NODESS"):
        setup_cfg(os.path.join(REPO, "configs/randwire_frcnn.yaml"), ["MODEL.RANDWIRE.NODESS", 8])
    cfg = tiny_detection_cfg("configs/randwire_frcnn.yaml", "MODEL.RANDWIRE.WS_K", 3)
    with pytest.raises(ValueError, match="MODEL.RANDWIRE.WS_K"):
        build_model(cfg)
    cfg = tiny_detection_cfg("configs/randwire_frcnn.yaml", "MODEL.RANDWIRE.DROP_PATH", 1.5)
    with pytest.raises(ValueError, match="DROP_PATH"):
        build_model(cfg)
    # on the command line too: the launching process reads the config before starting workers
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs/randwire_frcnn.yaml"), "--num-gpus", "2", "SOLVER.MAX_ITERR", "5"])
    with pytest.raises(KeyError, match="Non-existent config key: SOLVER.MAX_ITERR"):
        train_net.launch_from_args(args)


# --------------------------------------------------------------------------- lifecycle
def _ppids():
    """{pid: parent pid} of every process (Linux /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":  # zombies are dead, only not reaped yet
                out[int(entry)] = int(fields[1])
    return out


def _descendants(pid):
    ppids, found, todo = _ppids(), set(), [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in ppids.items() if pp == parent and p not in found]
        found.update(kids)
        todo.extend(kids)
    return found


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_lifecycle_sigkill_of_launcher_kills_workers_and_resume_takes_stale_lock(data, tmp_path):
    """SIGKILL the launcher of a real 2-process CPU run: no worker survives, nothing writes
    into OUTPUT_DIR afterwards, the lock it leaves is detected as stale, and an immediate
    --resume (default --dist-url: a free port, not the fixed one) takes it over and finishes."""
    from randwire_d2.engine.output_dir import LOCK_NAME, OutputDirLock, lock_owner_status

    config, opts = cls_opts(tmp_path / "out", max_iter=100000, period=1)
    out = opts["OUTPUT_DIR"]
    proc = _popen(data, config, opts, "--num-gpus", "2")
    try:
        _wait_for(lambda: os.path.exists(os.path.join(out, "last_checkpoint")) or proc.poll() is not None,
                  240, "the first checkpoint")
        assert proc.poll() is None, open(out + ".log").read()[-3000:]
        workers = _descendants(proc.pid)
        assert len(workers) >= 2, workers
        owner = OutputDirLock(out).read_owner()
        assert owner["pid"] == proc.pid and lock_owner_status(owner) == "live"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _wait_for(lambda: not (workers & set(_ppids())), 30, f"workers {workers} to die with their launcher")
    files = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    time.sleep(1.0)
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == files  # nobody writes
    assert lock_owner_status(OutputDirLock(out).read_owner()) == "stale"

    with open(os.path.join(out, "last_checkpoint")) as f:
        last = int(f.read().strip()[len("model_"):-len(".pth")])
    _, resume = cls_opts(tmp_path / "out", max_iter=last + 3, period=1)
    proc = _popen(data, config, resume, "--num-gpus", "2", "--resume")
    _wait(proc, resume)
    log = open(out + ".log").read()
    assert "taking over its stale lock" in log and f"pid {owner['pid']}" in log, log[-3000:]
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # released at the end


def _cli(data, config, opts, *flags, env=None, timeout=300):
    """tools/train_net.py's command line (through the runner that registers the test
    datasets): (exit code, stdout, stderr)."""
    run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    run_env.pop("RANDWIRE_DEBUG", None) if not env or "RANDWIRE_DEBUG" not in env else None
    out = subprocess.run([sys.executable, data["runner"], *_argv(config, opts, *flags)], cwd=REPO, env=run_env,
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout, out.stderr


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_lifecycle_lock_refuses_a_live_owner_and_an_unverifiable_host(data, tmp_path):
    from randwire_d2.engine.output_dir import LOCK_NAME, OutputDirLock, RunLockError

    config, opts = cls_opts(tmp_path / "out", max_iter=2)
    args = train_net.argument_parser().parse_args(_argv(config, opts))
    with OutputDirLock(opts["OUTPUT_DIR"]):  # a live run (this process) holds it
        with pytest.raises(RunLockError, match=rf"is in use by another run \(pid {os.getpid()} on host"):
            train_net.launch_from_args(args)
        assert not os.path.exists(os.path.join(opts["OUTPUT_DIR"], "last_checkpoint"))  # nothing ran
    lock = os.path.join(opts["OUTPUT_DIR"], LOCK_NAME)
    assert not os.path.exists(lock)
    with open(lock, "w") as f:
        json.dump({"pid": os.getpid(), "host": "other-host.example", "since": 0}, f)
    with pytest.raises(RunLockError, match=f"on another host.*delete {lock}"):
        OutputDirLock(opts["OUTPUT_DIR"]).acquire()
    # the same pid, reused by another process (another start time): stale
    with open(lock, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "start_time": "1", "since": 0}, f)
    with OutputDirLock(opts["OUTPUT_DIR"]) as taken:
        assert taken.read_owner()["start_time"] != "1"


def test_lifecycle_port_in_use_is_refused_and_default_url_picks_a_free_port():
    from randwire_d2.engine.launch import launch

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        with pytest.raises(ValueError, match=f"port {port} is already in use.*--dist-url auto"):
            launch(print, 2, dist_url=f"tcp://127.0.0.1:{port}", device="cpu")
    finally:
        busy.close()
    default = default_argument_parser().parse_args([])
    assert train_net._dist_url(default) == "auto"
    two_machines = default_argument_parser().parse_args(["--num-machines", "2", "--dist-url", "tcp://h:5"])
    assert train_net._dist_url(two_machines) == "tcp://h:5"


def _fail_on_rank_1(tag):
    from detectron2.utils import comm

    if comm.get_rank() == 1:
        raise ValueError(f"cfg.SOMETHING = {tag!r} is invalid (rank 1 only)")


def test_lifecycle_worker_error_comes_back_as_one_line():
    from randwire_d2.engine.errors import WorkerError
    from randwire_d2.engine.launch import launch

    with pytest.raises(WorkerError) as err:
        launch(_fail_on_rank_1, 2, args=("x",), device="cpu")
    assert str(err.value) == "rank 1: cfg.SOMETHING = 'x' is invalid (rank 1 only)"


# --------------------------------------------------------------------------- existing results
def test_results_new_run_over_checkpoints_is_refused_unless_overwrite(data, tmp_path):
    config, opts = cls_opts(tmp_path / "out", max_iter=2, period=1)
    _run_in_process(config, opts)
    out = opts["OUTPUT_DIR"]
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.endswith(".pth")}
    assert "model_final.pth" in before
    args = train_net.argument_parser().parse_args(_argv(config, opts))
    with pytest.raises(ValueError, match=r"holds checkpoints of a previous run \(last_checkpoint, model_0000000\.pth"
                                         r".*pass --resume to continue it, --overwrite to replace it"):
        train_net.launch_from_args(args)
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before  # untouched
    # --overwrite: a fresh run, without the old run's checkpoints or metrics mixed in
    _, longer = cls_opts(tmp_path / "out", max_iter=3, period=100)
    train_net.launch_from_args(train_net.argument_parser().parse_args(_argv(config, longer, "--overwrite")))
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_final.pth"]
    old_rows = [it for it in _train_metrics(out) if it < 2]  # the old run's last iteration was 1
    assert old_rows == [] and 2 in _train_metrics(out)
    assert not any(torch.equal(v, _weights(out)[k]) for k, v in torch.load(
        io.BytesIO(before["model_final.pth"]), weights_only=False)["model"].items() if v.dtype.is_floating_point
        and v.numel() > 1)


def test_results_truncated_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    model = _classifier()
    ckpt = RandWireCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001")
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ckpt.save("model_0000003")
    latest = tmp_path / "model_0000003.pth"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    fresh = _classifier(seed=0)
    with caplog.at_level("WARNING"):
        RandWireCheckpointer(fresh, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert all(torch.equal(good[k], v) for k, v in fresh.state_dict().items())
    assert (f"Cannot load checkpoint '{latest}'" in caplog.text
            and f"resumed from the previous good checkpoint '{tmp_path / 'model_0000001.pth'}' instead" in caplog.text)
    assert latest.stat().st_size == 1000  # the broken file is left for inspection


# --------------------------------------------------------------------------- no silent wrong answers
def _wide_classifier(channels, **extra):
    opts = ["MODEL.RANDWIRE.CHANNELS", channels, "MODEL.RANDWIRE.NODES", 6, "MODEL.RANDWIRE.HEAD_CHANNELS", 16]
    for k, v in extra.items():
        opts += [k, v]
    return build_model(setup_cfg(os.path.join(REPO, "configs/fashion_mnist/randwire_tiny.yaml"), opts))


def test_mismatch_width_refused_naming_parameter_and_shapes(tmp_path):
    from randwire_d2.checkpoint import to_detection_pkl

    RandWireCheckpointer(_wide_classifier(8), save_dir=str(tmp_path)).save("c8")
    path = str(tmp_path / "c8.pth")
    wide = _wide_classifier(16)
    start = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=r"its tensor 'backbone\.stem\.conv1\.weight' has shape \[4, 3, 3, 3\], the "
                                         r"model's 'backbone\.stem\.conv1\.weight' \[8, 3, 3, 3\].*PARTIAL_WEIGHTS True"):
        RandWireCheckpointer(wide).load(path)
    assert all(torch.equal(start[k], v) for k, v in wide.state_dict().items())  # nothing loaded
    # the converted .pkl into a detection backbone of another width (names matched by suffix)
    pkl = str(tmp_path / "c8.pkl")
    to_detection_pkl(torch.load(path, weights_only=False), pkl)
    det = build_model(tiny_detection_cfg("configs/randwire_frcnn.yaml", "MODEL.RANDWIRE.REGIME", "small",
                                         "MODEL.RANDWIRE.NODES", 6, "MODEL.RANDWIRE.CHANNELS", 16))
    with pytest.raises(ValueError, match=r"its tensor 'stem\.conv1\.weight' has shape \[4, 3, 3, 3\], the model's "
                                         r"'backbone\.bottom_up\.stem\.conv1\.weight' \[8, 3, 3, 3\]"):
        RandWireCheckpointer(det).load(pkl)
    # opting into partial loading: the fitting tensors load (here: none but shape-free ones), no error
    RandWireCheckpointer(_wide_classifier(16), partial_weights=True).load(path)
    # a checkpoint of an unrelated model: nothing fits
    torch.save({"model": {"foo.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"none of its 1 tensors \(e\.g\. 'foo\.weight'\) matches"):
        RandWireCheckpointer(wide).load(str(tmp_path / "other.pth"))


def test_mismatch_optimizer_on_resume_is_refused_saying_what_differs(data, tmp_path):
    config, opts = cls_opts(tmp_path / "out", max_iter=2, period=1)
    _run_in_process(config, opts)
    _, adamw = cls_opts(tmp_path / "out", max_iter=4, period=1, **{"SOLVER.OPTIMIZER": "AdamW"})
    with pytest.raises(ValueError, match=r"its optimizer state is SGD \(param-group settings momentum, nesterov, "
                                         r"dampening\) but this run's SOLVER.OPTIMIZER is 'AdamW'"):
        _run_in_process(config, adamw, "--resume")
    _, grouped = cls_opts(tmp_path / "out", max_iter=4, period=1, **{"SOLVER.WEIGHT_DECAY_NORM": 0.5})
    with pytest.raises(ValueError, match=r"parameter group\(s\) of .* tensors, this run's .*WEIGHT_DECAY_NORM"):
        _run_in_process(config, grouped, "--resume")


def _image_folder(root, classes, n=2):
    rng = np.random.default_rng(1)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return str(root)


def _register(name, root, **kwargs):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    return register_image_folder(name, root, **kwargs)


def test_mismatch_image_folder_class_lists_and_num_classes(data, tmp_path):
    from randwire_d2.data.classification import check_classification_datasets

    train = _register("rel_cls3_train", _image_folder(tmp_path / "train", ["ant", "bee", "cat"]))
    val = _register("rel_cls3_val", _image_folder(tmp_path / "val", ["ant", "cat"]))  # no 'bee' folder
    config, opts = cls_opts(tmp_path / "out", **{"DATASETS.TRAIN": (train,), "DATASETS.TEST": (val,),
                                                 "MODEL.RANDWIRE.NUM_CLASSES": 3})
    cfg = setup_cfg(*_cfg_args(config, opts))
    with pytest.raises(ValueError, match=r"Datasets 'rel_cls3_train' and 'rel_cls3_val' have different class lists "
                                         r"\(3 vs 2 classes; only in 'rel_cls3_train': \['bee'\].*classes="):
        check_classification_datasets(cfg)
    # in the launcher too, before any process starts, whatever --num-gpus
    args = train_net.argument_parser().parse_args(_argv(config, opts, "--num-gpus", "2"))
    with pytest.raises(ValueError, match="different class lists"):
        train_net.launch_from_args(args)
    # mapped explicitly: val's labels are indices in the training classes
    _register("rel_cls3_val", str(tmp_path / "val"), classes=["ant", "bee", "cat"])
    check_classification_datasets(cfg)
    assert sorted({d["label"] for d in DatasetCatalog.get("rel_cls3_val")}) == [0, 2]
    cfg.MODEL.RANDWIRE.NUM_CLASSES = 2  # fewer outputs than classes: was "IndexError: Target 2 is out of bounds"
    with pytest.raises(ValueError, match=r"NUM_CLASSES = 2 but DATASETS.TRAIN dataset 'rel_cls3_train' has 3 "
                                         r"classes: set MODEL.RANDWIRE.NUM_CLASSES 3"):
        check_classification_datasets(cfg)


# --------------------------------------------------------------------------- one-line errors
def test_errors_config_mistake_with_two_processes_is_one_line_before_any_process(data, tmp_path):
    config, opts = cls_opts(tmp_path / "out", **{"SOLVER.CHECKPOINT_PERIOD": 0})
    rc, stdout, stderr = _cli(data, config, opts, "--num-gpus", "2")
    assert rc == 1 and "Traceback" not in stderr and "ProcessRaisedException" not in stderr, stderr[-3000:]
    assert _error_lines(stderr) == [
        "error: cfg.SOLVER.CHECKPOINT_PERIOD = 0 is invalid: an integer >= 1. (traceback: RANDWIRE_DEBUG=1)"
    ], stderr[-3000:]
    assert not os.path.exists(os.path.join(opts["OUTPUT_DIR"], "log.txt"))  # no worker started


def test_errors_during_training_are_one_line_with_iteration_and_traceback_in_log(data, tmp_path):
    """A diverging run (LR 1e30: non-finite loss) through the command line, 2 processes:
    one error line naming the rank, the iteration and the last good checkpoint; the
    traceback in log.txt, on the console only with RANDWIRE_DEBUG=1."""
    config, opts = cls_opts(tmp_path / "out", max_iter=8, period=1, **{"SOLVER.BASE_LR": 1e30,
                                                                        "SOLVER.WARMUP_ITERS": 0})
    rc, stdout, stderr = _cli(data, config, opts, "--num-gpus", "2")
    lines = _error_lines(stderr)
    assert rc == 1 and "Traceback" not in stderr + stdout and len(lines) == 1, stderr[-3000:]
    it = int(lines[0].split("iteration ")[1].split(":")[0])
    assert lines[0].startswith(f"error: rank 0: training stopped at iteration {it}: FloatingPointError: Loss became "
                               f"infinite or NaN at iteration={it}!"), lines
    assert lines[0].endswith(f"(last good checkpoint: {opts['OUTPUT_DIR']}/model_{it - 1:07d}.pth) "
                             "(traceback: RANDWIRE_DEBUG=1, or OUTPUT_DIR/log.txt)"), lines
    log = open(os.path.join(opts["OUTPUT_DIR"], "log.txt")).read()
    assert "Traceback" in log and "FloatingPointError" in log
    RandWireCheckpointer(build_model(setup_cfg(*_cfg_args(config, opts)))).load(
        os.path.join(opts["OUTPUT_DIR"], f"model_{it - 1:07d}.pth"))  # the last good one is intact
    _, debug = cls_opts(tmp_path / "debug", max_iter=8, period=1, **{"SOLVER.BASE_LR": 1e30, "SOLVER.WARMUP_ITERS": 0})
    rc, stdout, stderr = _cli(data, config, debug, env={"RANDWIRE_DEBUG": "1"})
    assert rc != 0 and "Traceback" in stderr + stdout


def test_errors_disk_full_during_checkpoint_keeps_last_good_one(data, tmp_path, monkeypatch):
    from randwire_d2.engine.errors import TrainingError

    config, opts = cls_opts(tmp_path / "out", max_iter=6, period=2)
    real_save = torch.save
    saves = []

    def save_then_fill_disk(obj, f, *a, **k):
        saves.append(f)
        if len(saves) > 1:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fill_disk)
    with pytest.raises(TrainingError, match=r"^training stopped at iteration 3: OSError: \[Errno 28\] No space left "
                                            r"on device \(last good checkpoint: .*model_0000001\.pth\)$"):
        _run_in_process(config, opts)
    monkeypatch.setattr(torch, "save", real_save)
    out = opts["OUTPUT_DIR"]
    assert sorted(f for f in os.listdir(out) if "model" in f) == ["model_0000001.pth"]
    RandWireCheckpointer(build_model(setup_cfg(*_cfg_args(config, opts)))).load(os.path.join(out, "model_0000001.pth"))


@pytest.mark.parametrize("workers", [0, 1])
def test_errors_corrupt_image_during_training_names_file_and_iteration(data, tmp_path, workers):
    """Also from a DataLoader worker process: the worker's own one-line cause, not torch's
    flattened traceback."""
    from randwire_d2.engine.errors import TrainingError

    root = tmp_path / "imgs"
    _image_folder(root, ["dark", "bright"], n=2)
    broken = root / "bright" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])
    name = _register("rel_cls_corrupt", str(root))
    config, opts = cls_opts(tmp_path / "out", max_iter=8, **{"DATASETS.TRAIN": (name,), "DATALOADER.NUM_WORKERS": workers})
    with pytest.raises(TrainingError, match=rf"^training stopped at iteration \d+: Cannot read image '{broken}'") as err:
        _run_in_process(config, opts)
    message = str(err.value)
    assert "Traceback" not in message and "DataLoader worker" not in message and len(message) < 600, message


def test_errors_unwritable_output_dir_is_refused_before_launch(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config, opts = cls_opts(blocker / "out")
    args = train_net.argument_parser().parse_args(_argv(config, opts, "--num-gpus", "2"))
    with pytest.raises(ValueError, match=rf"cfg.OUTPUT_DIR = '{blocker / 'out'}' is not a writable folder: "
                                         "NotADirectoryError"):
        train_net.launch_from_args(args)


def test_errors_overridden_settings_reported_after_logging_starts(data, tmp_path):
    config, opts = cls_opts(tmp_path / "out", max_iter=50, **{"SOLVER.EPOCHS": 1.0})  # 12 images / batch 4
    _run_in_process(config, opts)
    log = open(os.path.join(opts["OUTPUT_DIR"], "log.txt")).read()
    assert ("SOLVER.MAX_ITER = 50 (set in the config/command line) is replaced by 3: SOLVER.EPOCHS" in log), log[-3000:]
    assert max(_train_metrics(opts["OUTPUT_DIR"])) <= 3


@pytest.mark.parametrize("precision,dtype", [("auto", None), ("bf16", torch.bfloat16)])
def test_trainer_trains_in_the_configured_precision(data, tmp_path, precision, dtype):
    """SOLVER.AMP.PRECISION reaches the training step (auto on CPU: fp32; bf16: CPU autocast)."""
    from randwire_d2.engine.precision import PrecisionTrainer

    config, opts = cls_opts(tmp_path / "out", max_iter=2, **{"SOLVER.AMP.PRECISION": precision})
    cfg = engine.setup(default_argument_parser().parse_args(_argv(config, opts)))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    assert isinstance(trainer._trainer, PrecisionTrainer)
    assert trainer._trainer.precision == ("fp32" if dtype is None else "bf16")
    seen = []
    trainer._trainer.model.register_forward_pre_hook(
        lambda m, i: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        if m.training else None
    )
    trainer.train()
    assert len(seen) == 2 and all(enabled == (dtype is not None) for enabled, _ in seen), seen
    if dtype is not None:
        assert all(d == dtype for _, d in seen)
