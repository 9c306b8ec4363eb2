"""Running a sweep's trainings: one ``tools/train_net.py`` process per run, here (one
after another or N at a time) or as a SLURM array job through submitit.

Each run's OUTPUT_DIR holds ``sweep_run.json`` (its status, attempts, wall time),
``sweep_train.log`` (the training's console output) and train_net's own files. A run
is *finished* when train_net exited 0 and wrote ``final_metrics.json``; a later
attempt (``--resume``) passes ``--resume`` to train_net, which continues from the
run's last checkpoint. A fresh run always starts in a directory that does not exist.
"""
import datetime
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, List, Optional

from ..engine import RESULTS_FILE
from ..engine.preemption import STOP_EXIT_CODES

__all__ = [
    "LOG_FILE",
    "STATUS_FILE",
    "TRAIN_NET",
    "TrainingJob",
    "command_of",
    "execute_task",
    "gpu_slots",
    "process_alive",
    "read_status",
    "run_local",
    "run_submitit",
]

STATUS_FILE = "sweep_run.json"
LOG_FILE = "sweep_train.log"
TRAIN_NET = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "tools", "train_net.py")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_status(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, STATUS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_status(output_dir: str, status: dict) -> None:
    path = os.path.join(output_dir, STATUS_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f, indent=1)
    os.replace(tmp, path)


def process_alive(host: Optional[str], pid: Optional[int]) -> bool:
    """Is ``pid`` a live process on this host? (False for other hosts: cannot tell.)"""
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (finished, not yet reaped) is not running
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a training and the worker processes it spawned (its own session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def command_of(task: dict) -> List[str]:
    """The train_net command of a task; ``--resume`` when the task resumes (a requeued
    SLURM task flips ``resume`` only)."""
    cmd = list(task["cmd"])
    if task.get("resume") and "--resume" not in cmd:
        cmd.insert(2, "--resume")  # after: python tools/train_net.py
    return cmd


def execute_task(task: dict, register: Callable[[subprocess.Popen], None] = None) -> dict:
    """Run one training (``task["cmd"]``) to the end; returns the run's updated status.

    ``task``: name, cmd, cwd, output_dir, config_hash, generator, seed, resume.
    Interrupted by an exception (Ctrl-C, SIGTERM) it stops the training, records the
    run as interrupted and re-raises.
    """
    out = task["output_dir"]
    os.makedirs(out, exist_ok=True)
    status = read_status(out) or {
        "name": task["name"], "generator": task["generator"], "seed": task["seed"],
        "config_hash": task["config_hash"], "attempts": [], "wall_time_s": 0.0,
    }
    attempt = {
        "started": _now(), "resume": bool(task["resume"]), "host": socket.gethostname(),
        "controller_pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "command": shlex.join(command_of(task)), "env": task.get("env", {}),
    }
    status["attempts"].append(attempt)
    status["status"] = "running"
    t0 = time.time()
    stopped = False
    with open(os.path.join(out, LOG_FILE), "a") as log:
        log.write(f"\n[{_now()}] $ {attempt['command']}\n")
        log.flush()
        env = dict(os.environ, **task.get("env", {}))
        proc = subprocess.Popen(command_of(task), cwd=task["cwd"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        attempt["pid"] = proc.pid
        write_status(out, status)
        if register is not None:
            register(proc)
        try:
            rc = proc.wait()
        except BaseException:
            stopped = True
            _kill_group(proc)
            rc = proc.wait()
            raise
        finally:
            wall = time.time() - t0
            attempt.update(ended=_now(), returncode=rc if not stopped else None, wall_time_s=round(wall, 2))
            status["wall_time_s"] = round(sum(a.get("wall_time_s", 0.0) for a in status["attempts"]), 2)
            # killed, or stopped by a signal after checkpointing (train_net exits 128 + signal)
            if stopped or (rc is not None and (rc < 0 or rc in STOP_EXIT_CODES)):
                status["status"] = "interrupted"
            elif rc == 0 and os.path.isfile(os.path.join(out, RESULTS_FILE)):
                status["status"] = "finished"
            else:
                status["status"] = "failed"
            status["returncode"] = attempt["returncode"]
            write_status(out, status)
    return status


def gpu_slots(parallel: int, num_gpus: int) -> List[str]:
    """CUDA_VISIBLE_DEVICES of each of ``parallel`` concurrent trainings: ``num_gpus``
    GPUs of their own each, from the GPUs visible here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    need = parallel * num_gpus
    if need > len(ids):
        raise ValueError(
            f"--parallel {parallel} x --num-gpus {num_gpus} needs {need} GPUs, {len(ids)} are visible here "
            f"({visible if visible is not None else 'all'}): lower --parallel or --num-gpus."
        )
    return [",".join(ids[k * num_gpus:(k + 1) * num_gpus]) for k in range(parallel)]


def run_local(tasks: List[dict], parallel: int = 1, progress: Callable[[dict, dict], None] = None,
              gpus: Optional[List[str]] = None) -> List[dict]:
    """Run ``tasks`` here, ``parallel`` at a time (with ``gpus``, each on its own
    CUDA_VISIBLE_DEVICES slot). Ctrl-C / SIGTERM stops them all (each recorded as
    interrupted, resumable with --resume) and starts no more."""
    live: Dict[int, subprocess.Popen] = {}
    lock = threading.Lock()
    stop = threading.Event()
    slots: "queue.Queue[str]" = queue.Queue()
    for slot in gpus or []:
        slots.put(slot)

    def register(proc):
        with lock:
            live[proc.pid] = proc

    def one(task):
        if stop.is_set():
            return None
        if not gpus:
            return execute_task(task, register)
        slot = slots.get()
        try:
            env = dict(task.get("env", {}), CUDA_VISIBLE_DEVICES=slot)
            return execute_task(dict(task, env=env), register)
        finally:
            slots.put(slot)

    results = []
    pool = ThreadPoolExecutor(max_workers=max(1, int(parallel)))
    futures = {pool.submit(one, t): t for t in tasks}
    try:
        for future in as_completed(futures):
            status = future.result()
            if status is not None:
                results.append(status)
                if progress is not None:
                    progress(futures[future], status)
    except BaseException:
        stop.set()
        with lock:
            procs = list(live.values())
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


class TrainingJob:
    """The callable submitit runs on a SLURM node. On preemption or time-out submitit
    calls :meth:`checkpoint`: the job is requeued and continues with train_net --resume."""

    def __call__(self, task: dict) -> dict:
        status = execute_task(task)
        if status["status"] != "finished":
            raise RuntimeError(
                f"run {task['name']} {status['status']} (exit code {status.get('returncode')}); "
                f"see {os.path.join(task['output_dir'], LOG_FILE)}"
            )
        return status

    def checkpoint(self, task: dict):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainingJob(), dict(task, resume=True))


def make_executor(folder: str, cluster: str, params: dict):
    """A submitit executor: ``cluster`` "slurm", or "local"/"debug" (runs here; for tests)."""
    try:
        import submitit
    except ImportError:
        raise ValueError(
            "--launcher slurm needs submitit: pip install submitit (or pip install -e '.[slurm]')."
        ) from None
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as exc:  # e.g. no srun on this machine
        raise ValueError(f"--launcher slurm: {exc} (run tools/sweep.py on a SLURM login node)") from None
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def run_submitit(tasks: List[dict], executor, wait: bool = True,
                 on_submitted: Callable[[List[dict], list], None] = None) -> List[dict]:
    """Submit ``tasks`` as one array job; with ``wait``, block until all have ended."""
    jobs = executor.map_array(TrainingJob(), tasks)
    if on_submitted is not None:
        on_submitted(tasks, jobs)
    if not wait:
        return []
    results = []
    for task, job in zip(tasks, jobs):
        try:
            job.result()
        except Exception as exc:  # the run's own status file says what happened
            print(f"[sweep] {task['name']}: job {job.job_id} ended with an error: {str(exc).strip().splitlines()[-1]}",
                  file=sys.stderr)
        status = read_status(task["output_dir"])
        if status is not None:
            results.append(status)
    return results
