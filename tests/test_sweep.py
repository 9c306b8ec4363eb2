"""tools/sweep.py: generators x seeds through tools/train_net.py, on tiny settings.

Trainings are real train_net subprocesses (3-12 iterations of a C=8 classifier on a
generated 3-class image folder), so each takes seconds.
"""
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from randwire_d2.engine import RESULTS_FILE
from randwire_d2.sweep import SWEEP_JSON, SWEEP_MD, SweepPlan, flatten_metrics, parse_generator, parse_seeds
from randwire_d2.sweep.runner import STATUS_FILE

from conftest import REPO

CONFIG = os.path.join(REPO, "configs/fashion_mnist/randwire_tiny.yaml")
TOOL = os.path.join(REPO, "tools", "sweep.py")


def _tool():
    spec = importlib.util.spec_from_file_location("sweep_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_opts(tmp_path_factory):
    """KEY VALUE opts: a 3-class folder dataset (class = dominant colour) and a tiny net."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 7)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (32, 32, 3)).astype(np.uint8)
                img[:, :, c] += 120
                Image.fromarray(img).save(d / f"{i}.png")
    return [
        "DATASETS.TRAIN", '("imagenet_train",)', "DATASETS.TEST", '("imagenet_val",)',
        "DATASETS.IMAGENET_ROOT", str(root), "MODEL.RANDWIRE.NUM_CLASSES", "3",
        "MODEL.RANDWIRE.CHANNELS", "8", "MODEL.RANDWIRE.NODES", "6", "MODEL.RANDWIRE.HEAD_CHANNELS", "32",
        "SOLVER.EPOCHS", "0.0", "SOLVER.WARMUP_EPOCHS", "0.0", "SOLVER.LR_PER_256", "0.0",
        "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.BASE_LR", "0.1",
        "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "32",
    ]


def _status(run_dir):
    with open(os.path.join(run_dir, STATUS_FILE)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- parsing
def test_parse_generators_and_seeds():
    ws = parse_generator("WS(4,0.75)", 32)
    assert ws == parse_generator("ws(k=4, p=0.75)", 32)
    assert (ws.label, ws.slug) == ("WS(4, 0.75)", "WS_k4_p0.75")
    assert ws.opts() == ["MODEL.RANDWIRE.GENERATOR", "WS", "MODEL.RANDWIRE.WS_K", "4", "MODEL.RANDWIRE.WS_P", "0.75"]
    assert parse_generator("ER(1)", 8).opts()[-1] == "1.0"  # a float key gets a float
    assert parse_generator("BA", 8, {"m": 3}).params == (("m", 3),)
    with pytest.raises(ValueError, match=r"--generators 'WS\(3,0.5\)'.*NODES = 32.*even"):
        parse_generator("WS(3,0.5)", 32)
    with pytest.raises(ValueError, match="not a generator"):
        parse_generator("XY(1)", 32)
    with pytest.raises(ValueError, match="not a number"):
        parse_generator("ER(high)", 32)
    assert parse_seeds(["0-2,5", "1", "7"]) == [0, 1, 2, 5, 7]
    with pytest.raises(ValueError, match="--seeds '3-1'"):
        parse_seeds(["3-1"])


def test_metrics_of_detection_and_several_test_sets():
    from randwire_d2.sweep.report import pick_metric, summarize_runs

    single = {"bbox": {"AP": 40.0, "AP50": 60.0, "APs": float("nan")}}
    assert flatten_metrics(single) == {"bbox/AP": 40.0, "bbox/AP50": 60.0, "bbox/APs": None}
    nested = {"coco_val": {"bbox": {"AP": 40.0}}, "voc_test": {"bbox": {"AP": 55.0, "APm": None}}}
    assert flatten_metrics(nested) == {"coco_val/bbox/AP": 40.0, "voc_test/bbox/AP": 55.0, "voc_test/bbox/APm": None}
    runs = [{"generator": "ER(0.2)", "seed": s, "status": "finished", "metrics": flatten_metrics(single)}
            for s in (0, 1)]
    assert pick_metric(runs) == "bbox/AP"
    assert pick_metric([{"metrics": flatten_metrics(nested)}]) == "coco_val/bbox/AP"
    with pytest.raises(ValueError, match="--metric 'top1' is not among"):
        pick_metric(runs, "top1")
    stats = summarize_runs(runs, ["ER(0.2)"])["ER(0.2)"]["metrics"]
    assert stats["bbox/AP"] == {"mean": 40.0, "std": 0.0, "min": 40.0, "max": 40.0, "n": 2}
    assert stats["bbox/APs"]["n"] == 0  # NaN is no value, not a zero


def test_cli_splits_trailing_opts_and_refuses_sweep_keys(tiny_opts, tmp_path):
    tool = _tool()
    args = tool.parse_args(["--config-file", CONFIG, "--seeds", "0-1", "--generators", "WS(4,0.75)", "ER(0.2)",
                            "SOLVER.MAX_ITER", "5"])
    assert args.generators == ["WS(4,0.75)", "ER(0.2)"] and args.opts == ["SOLVER.MAX_ITER", "5"]
    args = tool.parse_args(["--config-file", CONFIG, "--generators", "BA(2)", "--seeds", "0-1", "SEED", "3"])
    assert args.seeds == ["0-1"] and args.opts == ["SEED", "3"]
    # per-run placeholders: each seed fine-tunes its own pretrained backbone
    plan = SweepPlan.create(CONFIG, tiny_opts + ["MODEL.WEIGHTS", "pre/{generator}/seed{seed}/model_final.pth"],
                            ["BA(2)"], ["3"], str(tmp_path))
    opts = plan.run_opts(plan.runs[0])
    assert opts[opts.index("MODEL.WEIGHTS") + 1] == "pre/BA_m2/seed3/model_final.pth"
    with pytest.raises(ValueError, match=r"\['MODEL.RANDWIRE.SEED'\] are set by the sweep"):
        SweepPlan.create(CONFIG, tiny_opts + ["MODEL.RANDWIRE.SEED", "1"], ["WS"], ["0"], str(tmp_path))


def test_one_controller_per_sweep_dir(tiny_opts, tmp_path):
    from randwire_d2.sweep import run_sweep
    from randwire_d2.sweep.controller import sweep_lock

    plan = SweepPlan.create(CONFIG, tiny_opts, ["WS(4,0.75)"], ["0"], str(tmp_path / "sweep"))
    with sweep_lock(plan.sweep_dir):
        with pytest.raises(ValueError, match=rf"Another tools/sweep.py \(pid {os.getpid()} .*\) is working on"):
            run_sweep(plan)
    assert not os.path.exists(plan.runs[0].output_dir)  # nothing started


def test_cpu_threads_share_the_cores(monkeypatch):
    from randwire_d2.sweep import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads("cpu", 1, 1) == cores
    assert cpu_threads("cpu", 2, 2) == max(1, cores // 4)
    assert cpu_threads("cuda", 2, 1) is None  # GPU runs keep torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads("cpu", 2, 1) is None  # the user's setting wins


def test_parallel_gpu_trainings_get_their_own_gpus(monkeypatch):
    from randwire_d2.sweep.runner import gpu_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert gpu_slots(2, 4) == ["0,1,2,3", "4,5,6,7"]
    assert gpu_slots(3, 2) == ["0,1", "2,3", "4,5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_slots(2, 1) == ["3", "5"]
    with pytest.raises(ValueError, match="--parallel 2 x --num-gpus 2 needs 4 GPUs, 2 are visible"):
        gpu_slots(2, 2)


def test_run_local_hands_each_training_a_gpu_slot(tmp_path):
    from randwire_d2.sweep.runner import run_local

    script = ("import os, sys, time; time.sleep(0.5); "
              "open(os.path.join(sys.argv[1], 'cvd'), 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])")
    tasks = [
        {"name": f"t{i}", "cmd": [sys.executable, "-c", script, str(tmp_path / f"t{i}")], "cwd": str(tmp_path),
         "output_dir": str(tmp_path / f"t{i}"), "config_hash": "h", "generator": "WS(4, 0.75)", "seed": i,
         "resume": False, "env": {"OMP_NUM_THREADS": "1"}}
        for i in range(4)
    ]
    statuses = run_local(tasks, parallel=2, gpus=["0,1", "2,3"])
    assert sorted(s["name"] for s in statuses) == ["t0", "t1", "t2", "t3"]
    assert all(s["status"] == "failed" for s in statuses)  # exit 0 but no final_metrics.json: not finished
    used = [(tmp_path / f"t{i}" / "cvd").read_text() for i in range(4)]
    assert set(used) == {"0,1", "2,3"}  # both slots, nothing else
    envs = [_status(str(tmp_path / f"t{i}"))["attempts"][0]["env"] for i in range(4)]
    assert all(e["OMP_NUM_THREADS"] == "1" and e["CUDA_VISIBLE_DEVICES"] in ("0,1", "2,3") for e in envs)


def test_config_hash_mismatch_refused(tiny_opts, tmp_path):
    sweep_dir = str(tmp_path / "sweep")
    plan = SweepPlan.create(CONFIG, tiny_opts, ["WS(4,0.75)"], ["0-1"], sweep_dir)
    digest = plan.check_or_record_config()
    # more seeds and generators, the same training settings: the same sweep
    wider = SweepPlan.create(CONFIG, tiny_opts, ["WS(4,0.75)", "BA(2)"], ["0-4"], sweep_dir)
    assert wider.check_or_record_config() == digest
    changed = SweepPlan.create(CONFIG, tiny_opts + ["SOLVER.BASE_LR", "0.2"], ["WS(4,0.75)"], ["0-1"], sweep_dir)
    with pytest.raises(ValueError, match=r"(?s)different config.*SOLVER.BASE_LR: 0.1 in the sweep, 0.2 now.*--output-dir"):
        changed.check_or_record_config()
    fixed = SweepPlan.create(CONFIG, tiny_opts, ["WS(4,0.75)"], ["0-1"], sweep_dir, fixed_training_seed=True)
    with pytest.raises(ValueError, match="sweep.fixed_training_seed"):
        fixed.check_or_record_config()


# ----------------------------------------------------------------------------- end to end
def test_sweep_2x2_end_to_end(tiny_opts, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    argv = ["--config-file", CONFIG, "--generators", "WS(4,0.75)", "ER(0.4)", "--seeds", "0-1",
            "--output-dir", out, "--parallel", "2"] + tiny_opts
    assert _tool().main(argv) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, SWEEP_JSON)) as f:
        sweep = json.load(f)
    assert sweep["metric"] == "classification/top1"
    assert [(r["generator"], r["seed"]) for r in sweep["runs"]] == [
        ("WS(4, 0.75)", 0), ("WS(4, 0.75)", 1), ("ER(0.4)", 0), ("ER(0.4)", 1)]
    hashes = set()
    for r in sweep["runs"]:
        assert r["status"] == "finished" and r["attempts"] == 1 and r["wall_time_s"] > 0
        with open(os.path.join(r["output_dir"], RESULTS_FILE)) as f:
            assert r["metrics"] == flatten_metrics(json.load(f))  # the run's own numbers
        assert r["metrics"]["classification/num_images"] == 21
        with open(os.path.join(r["output_dir"], "config.yaml")) as f:  # train_net's own record of the run
            cfg = yaml.safe_load(f)
        assert cfg["MODEL"]["RANDWIRE"]["SEED"] == r["seed"] and cfg["SEED"] == r["seed"]
        assert cfg["MODEL"]["RANDWIRE"]["GENERATOR"] == r["generator"][:2]
        assert 5_000 < r["params"] < 50_000 and r["flops"] > 10_000 and r["flops_input_size"] == 32
        assert sorted(r["graphs"]) == ["res3", "res4", "res5"]
        hashes.add(tuple(sorted(r["graphs"].values())))
    assert len(hashes) == 4  # every (generator, seed) its own graphs
    for label in ("WS(4, 0.75)", "ER(0.4)"):
        runs = [r for r in sweep["runs"] if r["generator"] == label]
        for key in ("classification/top1", "classification/top5"):
            values = [r["metrics"][key] for r in runs]
            s = sweep["summary"][label]["metrics"][key]
            assert s["n"] == 2 and s["min"] == min(values) and s["max"] == max(values)
            assert s["mean"] == pytest.approx(statistics.mean(values)) and s["std"] == pytest.approx(statistics.stdev(values))
        assert sweep["summary"][label]["params"]["mean"] == pytest.approx(statistics.mean(r["params"] for r in runs))
        top1 = sweep["summary"][label]["metrics"]["classification/top1"]
        row = f"| {label} | 2 | {top1['mean']:.2f} ± {top1['std']:.2f} | {top1['min']:.2f} | {top1['max']:.2f} |"
        assert row in printed
        assert row in open(os.path.join(out, SWEEP_MD)).read()
    figures = [os.path.join(out, p) for p in sweep["figures"]]
    assert len(figures) == 2 + 4  # metric per generator, vs FLOPs, best + worst graphs of each generator
    for path in figures:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10_000
    assert any(p.endswith("graphs/ER_p0.4_best_seed0.png") or p.endswith("graphs/ER_p0.4_best_seed1.png")
               for p in figures)

    # the same command again: nothing is retrained, the results are the same
    before = [os.path.getmtime(os.path.join(r["output_dir"], RESULTS_FILE)) for r in sweep["runs"]]
    assert _tool().main(argv) == 0
    with open(os.path.join(out, SWEEP_JSON)) as f:
        again = json.load(f)
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in sweep["runs"]]
    assert [r["attempts"] for r in again["runs"]] == [1, 1, 1, 1]
    assert before == [os.path.getmtime(os.path.join(r["output_dir"], RESULTS_FILE)) for r in sweep["runs"]]


def test_resume_after_killed_run(tiny_opts, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    argv = ["--config-file", CONFIG, "--generators", "BA(2)", "--seeds", "4", "--output-dir", out]
    opts = tiny_opts + ["SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2"]
    run_dir = os.path.join(out, "runs", "BA_m2", "seed4")
    proc = subprocess.Popen([sys.executable, TOOL] + argv + opts, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not os.path.isfile(os.path.join(run_dir, "model_0000001.pth")):  # iteration 2 checkpointed
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0].decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what scancel / kill sends
    log = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 1 and "can continue with --resume" in log, log[-2000:]
    status = _status(run_dir)
    assert status["status"] == "interrupted", status
    assert not os.path.isfile(os.path.join(run_dir, RESULTS_FILE))

    # without --resume the interrupted run is left alone, and the sweep says how to go on
    assert _tool().main(argv + opts) == 1
    assert "rerun with --resume" in capsys.readouterr().out
    assert len(_status(run_dir)["attempts"]) == 1

    assert _tool().main(["--resume"] + argv + opts) == 0
    status = _status(run_dir)
    assert status["status"] == "finished" and [a["resume"] for a in status["attempts"]] == [False, True]
    train_log = open(os.path.join(run_dir, "log.txt")).read()
    starts = [int(line.rsplit(" ", 1)[1]) for line in train_log.splitlines() if "Starting training from iteration" in line]
    assert starts[0] == 0 and starts[-1] >= 2, starts  # continued from a checkpoint, not from scratch
    with open(os.path.join(out, SWEEP_JSON)) as f:
        record = json.load(f)["runs"][0]
    with open(os.path.join(run_dir, RESULTS_FILE)) as f:
        assert record["metrics"] == flatten_metrics(json.load(f))
    assert record["attempts"] == 2 and record["wall_time_s"] == pytest.approx(status["wall_time_s"])


def test_submitit_local_executor(tiny_opts, tmp_path):
    """The --launcher slurm code path (array job of TrainingJob), run by submitit's local executor."""
    pytest.importorskip("submitit")
    out = str(tmp_path / "sweep")
    argv = ["--launcher", "slurm", "--submitit-cluster", "local", "--time", "10", "--config-file", CONFIG,
            "--generators", "WS(2,0.5)", "--seeds", "7", "--output-dir", out] + tiny_opts
    assert _tool().main(argv) == 0
    with open(os.path.join(out, SWEEP_JSON)) as f:
        record = json.load(f)["runs"][0]
    assert record["status"] == "finished"
    with open(os.path.join(record["output_dir"], RESULTS_FILE)) as f:
        assert record["metrics"] == flatten_metrics(json.load(f))
    with open(os.path.join(out, "slurm_jobs.json")) as f:
        job_id = json.load(f)["WS_k2_p0.5/seed7"]
    assert os.path.isfile(os.path.join(out, "slurm", job_id, f"{job_id}_0_result.pkl")) or any(
        name.endswith("_result.pkl") for _, _, files in os.walk(os.path.join(out, "slurm")) for name in files)


def test_slurm_array_script(tiny_opts, tmp_path, monkeypatch):
    """With --launcher slurm the flags land in submitit's sbatch script (fake sbatch/srun here)."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):
        (bin_dir / name).write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "sweep"
    argv = ["--launcher", "slurm", "--no-wait", "--partition", "gpu", "--time", "4320", "--num-gpus", "8",
            "--cpus-per-task", "64", "--array-parallelism", "3", "--config-file", CONFIG,
            "--generators", "WS(4,0.75)", "ER(0.2)", "--seeds", "0-1", "--output-dir", str(out)] + tiny_opts
    assert _tool().main(argv) == 1  # submitted, not finished
    with open(out / "slurm_jobs.json") as f:
        assert sorted(json.load(f).values()) == ["4242_0", "4242_1", "4242_2", "4242_3"]
    script = (out / "slurm" / "4242" / "4242_submission.sh").read_text()
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --time=4320",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=USR2@90"):
        assert line in script, script
    # each array task runs one pickled TrainingJob: the train_net command of its run
    import pickle

    with open(out / "slurm" / "4242_3" / "4242_3_submitted.pkl", "rb") as f:
        delayed = pickle.load(f)
    task = delayed.args[0]
    assert task["name"] == "ER_p0.2/seed1" and task["cmd"][1].endswith("tools/train_net.py")
    assert task["cmd"][task["cmd"].index("--num-gpus") + 1] == "8"
    assert task["cmd"][-4:] == ["MODEL.RANDWIRE.SEED", "1", "SEED", "1"] and not task["resume"]
    # preempted or timed out: submitit requeues what checkpoint() returns, a resuming run
    from randwire_d2.sweep.runner import command_of

    requeued = delayed.function.checkpoint(task)
    assert requeued.args[0]["resume"] is True and requeued.args[0]["name"] == task["name"]
    assert "--resume" not in command_of(task)
    assert command_of(requeued.args[0])[:3] == [sys.executable, task["cmd"][1], "--resume"]
