"""The sweep controller: which runs to start, launching them, collecting the results."""
import contextlib
import datetime
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from ..engine import RESULTS_FILE
from .plan import Run, SweepPlan
from .report import format_tables, make_figures, pick_metric, read_metrics, summarize_runs
from .runner import LOG_FILE, gpu_slots, make_executor, process_alive, read_status, run_local, run_submitit, write_status

__all__ = ["SWEEP_JSON", "SWEEP_MD", "LaunchOptions", "collect", "cpu_threads", "run_states", "run_sweep",
           "task_for", "write_outputs"]

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
JOBS_FILE = "slurm_jobs.json"
LOCK_FILE = ".sweep.lock"
ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


@dataclass
class LaunchOptions:
    launcher: str = "local"  # "local" or "slurm"
    parallel: int = 1  # local: trainings at a time
    num_gpus: int = 1  # processes (GPUs) per training, tools/train_net.py --num-gpus
    resume: bool = False  # continue interrupted / failed runs from their last checkpoint
    collect_only: bool = False  # start nothing: collect what is there
    wait: bool = True  # slurm: block until the jobs end, then collect
    cluster: str = "slurm"  # submitit cluster; "local"/"debug" run the slurm path on this machine
    slurm: Dict[str, object] = field(default_factory=dict)  # submitit parameters (timeout_min, slurm_partition...)


@contextlib.contextmanager
def sweep_lock(sweep_dir: str):
    """One controller per sweep directory at a time (released if it dies)."""
    os.makedirs(sweep_dir, exist_ok=True)
    path = os.path.join(sweep_dir, LOCK_FILE)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(
            f"Another tools/sweep.py ({holder}) is working on {sweep_dir}: wait for it to end "
            "(or stop it) before running this sweep again."
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _read_jobs(sweep_dir: str) -> Dict[str, str]:
    path = os.path.join(sweep_dir, JOBS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_jobs(sweep_dir: str, jobs: Dict[str, str]) -> None:
    path = os.path.join(sweep_dir, JOBS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(jobs, f, indent=1)
    os.replace(path + ".tmp", path)


def _slurm_job_active(sweep_dir: str, job_id: str) -> bool:
    try:
        import submitit

        state = submitit.SlurmJob(folder=os.path.join(sweep_dir, "slurm", "%j"), job_id=str(job_id)).state
    except Exception as exc:  # no sacct here, foreign id...: say so, treat as ended
        print(f"[sweep] cannot query SLURM job {job_id} ({exc}); treating it as ended", file=sys.stderr)
        return False
    return str(state).split()[0] in ACTIVE_SLURM_STATES


def run_states(plan: SweepPlan, config_hash: str, launcher: str = "local", cluster: str = "slurm") -> Dict[str, str]:
    """{run name: "finished" | "pending" | "interrupted" | "failed" | "in flight"}."""
    jobs = _read_jobs(plan.sweep_dir)
    states = {}
    for run in plan.runs:
        status = read_status(run.output_dir)
        if status is not None and status.get("config_hash") != config_hash:
            raise ValueError(
                f"Run directory {run.output_dir} was trained with config hash {status.get('config_hash', '?')[:12]}, "
                f"not this sweep's {config_hash[:12]}: move it away or use a new --output-dir."
            )
        job_active = (launcher == "slurm" and cluster == "slurm" and run.name in jobs
                      and _slurm_job_active(plan.sweep_dir, jobs[run.name]))
        if status is None:
            started = os.path.isdir(run.output_dir) and bool(os.listdir(run.output_dir))
            states[run.name] = "in flight" if job_active else ("interrupted" if started else "pending")
            continue
        state = status.get("status")
        if state == "finished" and os.path.isfile(os.path.join(run.output_dir, RESULTS_FILE)):
            states[run.name] = "finished"
        elif state == "running":
            last = status["attempts"][-1] if status.get("attempts") else {}
            alive = process_alive(last.get("host"), last.get("pid"))
            states[run.name] = "in flight" if alive or job_active else "interrupted"
        else:
            states[run.name] = "failed" if state == "failed" else "interrupted"
    return states


def cpu_threads(device: str, parallel: int, num_gpus: int) -> Optional[int]:
    """Intra-op threads per CPU training process so that ``parallel`` trainings of
    ``num_gpus`` processes share the cores instead of oversubscribing them (which
    slows CPU training down several-fold); None on GPUs or when OMP_NUM_THREADS is set."""
    if str(device).startswith("cuda") or os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, parallel * num_gpus))


def task_for(plan: SweepPlan, run: Run, config_hash: str, num_gpus: int, resume: bool,
             threads: Optional[int] = None) -> dict:
    """The picklable description of one training (what a local thread or a SLURM job runs)."""
    from .runner import TRAIN_NET

    cmd = [sys.executable, TRAIN_NET, "--config-file", plan.config_file, "--num-gpus", str(num_gpus)]
    if num_gpus > 1:
        cmd += ["--dist-url", "auto"]  # a free port each: parallel trainings must not collide
    cmd += plan.run_opts(run)  # runner.command_of adds --resume when the task resumes
    return {
        "name": run.name, "cmd": cmd, "cwd": os.getcwd(), "output_dir": run.output_dir,
        "config_hash": config_hash, "generator": run.generator.label, "seed": run.seed, "resume": bool(resume),
        "env": {"OMP_NUM_THREADS": str(threads)} if threads else {},
    }


def _analysis(plan: SweepPlan, run: Run) -> dict:
    """Params / FLOPs of the trained network (its checkpoint's graphs) and its graph hashes."""
    from ..analysis import build_analysis_model, complexity, load_config
    from ..config import randwire_kwargs

    ckpt = os.path.join(run.output_dir, "model_final.pth")
    opts = plan.run_opts(run) + (["MODEL.RANDWIRE.GRAPHS_FILE", ckpt] if os.path.isfile(ckpt) else [])
    cfg = load_config(plan.config_file, opts)
    classifier = cfg.MODEL.META_ARCHITECTURE == "RandWireClassifier"
    size = int(cfg.INPUT.CROP_SIZE) if classifier else 224
    graphs = randwire_kwargs(cfg)["graphs"]
    counts = complexity(build_analysis_model(cfg), size, in_channels=len(cfg.MODEL.PIXEL_MEAN))
    return {
        "params": counts["params"],
        "flops": counts["flops"],
        "flops_input_size": size,
        "flops_model": "classifier" if classifier else "backbone",
        "graphs": {stage: spec.content_hash for stage, spec in sorted(graphs.items())},
        "graphs_source": ckpt if os.path.isfile(ckpt) else "config",
    }


def collect(plan: SweepPlan, config_hash: str, states: Dict[str, str], metric: Optional[str] = None) -> dict:
    """The sweep's results (what sweep.json holds)."""
    records = []
    for run in plan.runs:
        status = read_status(run.output_dir) or {}
        record = {
            "generator": run.generator.label, "generator_slug": run.generator.slug, "seed": run.seed,
            "output_dir": run.output_dir, "status": states[run.name],
            "wall_time_s": status.get("wall_time_s"), "attempts": len(status.get("attempts", [])),
        }
        if states[run.name] == "finished":
            record["metrics"] = read_metrics(run.output_dir)
            if status.get("analysis", {}).get("config_hash") != config_hash:
                try:
                    status["analysis"] = dict(_analysis(plan, run), config_hash=config_hash)
                    write_status(run.output_dir, status)
                except Exception as exc:  # keep the run's metrics; say why its counts are missing
                    record["analysis_error"] = f"{type(exc).__name__}: {exc}"
                    print(f"[sweep] {run.name}: params/FLOPs not counted: {record['analysis_error']}", file=sys.stderr)
            record.update({k: v for k, v in status.get("analysis", {}).items() if k != "config_hash"})
        records.append(record)
    metric = pick_metric(records, metric)
    labels = [g.label for g in plan.generators]
    first = next((r for r in records if "flops" in r), None)
    return {
        "config_file": plan.config_file,
        "opts": plan.opts,
        "config_hash": config_hash,
        "generators": labels,
        "seeds": plan.seeds,
        "fixed_training_seed": plan.fixed_training_seed,
        "metric": metric,
        "flops_note": (f"fvcore, {first['flops_model']} at {first['flops_input_size']} px" if first else "fvcore"),
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runs": records,
        "summary": summarize_runs(records, labels),
    }


def write_outputs(sweep: dict, sweep_dir: str) -> List[str]:
    """sweep.json, sweep.md and the figures; returns their paths."""
    figures = make_figures(sweep, os.path.join(sweep_dir, "figures"))
    sweep["figures"] = [os.path.relpath(p, sweep_dir) for p in figures]
    path = os.path.join(sweep_dir, SWEEP_JSON)
    with open(path + ".tmp", "w") as f:
        json.dump(sweep, f, indent=1)
    os.replace(path + ".tmp", path)
    md = os.path.join(sweep_dir, SWEEP_MD)
    lines = [
        f"# Sweep: {os.path.basename(sweep['config_file'])} {' '.join(sweep['opts'])}".rstrip(),
        "",
        f"Config hash `{sweep['config_hash'][:12]}`; seeds {sweep['seeds']}; metric `{sweep['metric']}` "
        f"(mean ± sample std over finished seeds); FLOPs: {sweep['flops_note']}. Updated {sweep['updated']}.",
        "",
        format_tables(sweep),
        "",
    ]
    lines += [f"![{p}]({p})" for p in sweep["figures"] if "/graphs/" not in f"/{p}"]
    graphs = [p for p in sweep["figures"] if "/graphs/" in f"/{p}"]
    if graphs:
        lines += ["", "Stage graphs of each generator's best and worst seed:", ""] + [f"- [{p}]({p})" for p in graphs]
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return [path, md] + figures


def _last_line(path: str) -> str:
    """train_net's one-line error from a training log, else its last line."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines()[-50:] if line.strip()]
    except OSError:
        return "?"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["?"])[-1][-300:]


def run_sweep(plan: SweepPlan, options: LaunchOptions = None, metric: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict:
    """Start what needs starting, wait (local, or slurm with ``wait``), collect, write
    sweep.json / sweep.md / figures. Returns the sweep dict plus ``"counts"``."""
    options = options or LaunchOptions()
    if options.launcher not in ("local", "slurm"):
        raise ValueError(f"--launcher {options.launcher!r}: allowed are 'local' and 'slurm'.")
    if options.parallel < 1 or options.num_gpus < 1:
        raise ValueError("--parallel and --num-gpus must be >= 1.")
    t0 = time.time()
    with sweep_lock(plan.sweep_dir):
        config_hash = plan.check_or_record_config()
        states = run_states(plan, config_hash, options.launcher, options.cluster)
        by_name = {run.name: run for run in plan.runs}
        start = [n for n, s in states.items() if s == "pending"]
        retry = [n for n, s in states.items() if s in ("interrupted", "failed")]
        counts = {s: sum(1 for v in states.values() if v == s) for s in set(states.values())}
        log(f"[sweep] {plan.sweep_dir}: {len(states)} runs ({len(plan.generators)} generators x "
            f"{len(plan.seeds)} seeds): " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        if retry and not options.resume:
            log(f"[sweep] not restarting {len(retry)} interrupted/failed run(s) ({', '.join(retry)}): "
                "rerun with --resume to continue them from their last checkpoints.")
        names = start + (retry if options.resume else [])
        threads, gpus = None, None
        if options.launcher == "local" and names and not options.collect_only:
            device = str(plan.base_cfg().MODEL.DEVICE)
            threads = cpu_threads(device, options.parallel, options.num_gpus)
            if device.startswith("cuda") and options.parallel > 1:  # each training its own GPUs
                gpus = gpu_slots(options.parallel, options.num_gpus)
        tasks = [task_for(plan, by_name[n], config_hash, options.num_gpus, n in retry, threads) for n in names]
        if tasks and not options.collect_only:
            log(f"[sweep] starting {len(tasks)} training(s) with --launcher {options.launcher}"
                + (f" ({options.parallel} at a time)" if options.launcher == "local" else ""))
            if options.launcher == "local":
                def progress(task, status):
                    path = os.path.join(task["output_dir"], LOG_FILE)
                    why = f": {_last_line(path)}" if status["status"] == "failed" else ""
                    log(f"[sweep] {task['name']}: {status['status']} in {status['wall_time_s']:.0f} s{why} (log: {path})")

                run_local(tasks, options.parallel, progress, gpus=gpus)
            else:
                params = dict(options.slurm)
                params.setdefault("name", "randwire_sweep")
                executor = make_executor(os.path.join(plan.sweep_dir, "slurm", "%j"), options.cluster, params)

                def submitted(tasks_, jobs):
                    ids = _read_jobs(plan.sweep_dir)
                    ids.update({t["name"]: str(j.job_id) for t, j in zip(tasks_, jobs)})
                    _write_jobs(plan.sweep_dir, ids)
                    log(f"[sweep] submitted {len(jobs)} job(s): {', '.join(str(j.job_id) for j in jobs)}")

                run_submitit(tasks, executor, wait=options.wait, on_submitted=submitted)
            states = run_states(plan, config_hash, options.launcher, options.cluster)
        sweep = collect(plan, config_hash, states, metric)
        sweep["elapsed_s"] = round(time.time() - t0, 1)
        paths = write_outputs(sweep, plan.sweep_dir)
    sweep["counts"] = {s: sum(1 for v in states.values() if v == s) for s in set(states.values())}
    sweep["paths"] = paths
    return sweep
