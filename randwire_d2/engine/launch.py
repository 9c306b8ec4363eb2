"""Multi-process launch for training on GPUs (NCCL, through detectron2) and on CPUs (gloo).

detectron2's ``launch`` spawns one worker per GPU and, in v0.6, asserts CUDA in every
worker and always uses NCCL. :func:`launch` keeps its signature and behaviour on GPUs
and adds the CPU path: ``num_processes_per_machine`` workers started with
``torch.multiprocessing``, a gloo process group initialised here, and detectron2's
per-machine ("local") process group set up as detectron2 does (``comm.create_local_process_group``
at HEAD, ``comm._LOCAL_PROCESS_GROUP`` in v0.6), so ``comm.get_local_rank()`` works.

Multi-machine: call it on every machine with the same ``num_machines`` and ``dist_url``
(``tcp://HOST:PORT`` of machine 0) and that machine's ``machine_rank``.

Lifecycle: every worker dies with its launcher, whatever ends the launcher (SIGKILL
included): Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) plus a thread that
watches the parent pid (other systems, and the window before prctl). A worker that
fails writes its one-line cause to a file the launcher reads, so the launcher raises
:class:`~randwire_d2.engine.errors.WorkerError` with that cause instead of torch's
``ProcessRaisedException`` wrapping a traceback.
"""
import ctypes
import datetime
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.utils import comm

from .errors import WorkerError, one_line
from .preemption import RunStopped, forward_stop_signals, ignore_stop_signals

__all__ = ["DEFAULT_TIMEOUT", "check_port_free", "die_with_parent", "launch", "uses_cuda"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


def uses_cuda(device) -> bool:
    """True when training runs on CUDA devices: ``device`` (cfg.MODEL.DEVICE) names cuda
    (or is None) and CUDA is available."""
    if not torch.cuda.is_available():
        return False
    return device is None or str(device).startswith("cuda")


def _find_free_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def check_port_free(dist_url: str) -> None:
    """On the machine that hosts the rendezvous (machine 0): refuse a tcp:// port that is
    already taken, before any worker fails on it with EADDRINUSE."""
    url = urlparse(dist_url)
    if url.scheme != "tcp" or url.port is None:
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle, a listener is
    try:
        sock.bind(("", url.port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return
        raise ValueError(
            f"--dist-url {dist_url}: port {url.port} is already in use (another training on this machine?): "
            "pass --dist-url auto to pick a free port (single machine), or another port."
        ) from None
    finally:
        sock.close()


def _check_launch_args(num_per_machine, num_machines, machine_rank, dist_url):
    for name, value, low in (("processes per machine", num_per_machine, 1), ("num_machines", num_machines, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"launch: {name} must be an integer >= {low}, got {value!r}.")
    if not isinstance(machine_rank, int) or not 0 <= machine_rank < num_machines:
        raise ValueError(f"launch: machine_rank must be in [0, {num_machines}), got {machine_rank!r}.")
    if num_machines > 1 and (not dist_url or dist_url == "auto"):
        raise ValueError(
            "launch: a multi-machine job needs --dist-url tcp://HOST:PORT (HOST = machine 0, "
            "reachable from every machine; the same URL on every machine)."
        )


def launch(
    main_func,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    device: str = None,
):
    """Run ``main_func(*args)`` in ``num_processes_per_machine * num_machines`` processes.

    ``device`` is cfg.MODEL.DEVICE: with CUDA it is detectron2's ``launch`` (one process
    per GPU, NCCL); on CPU (``device="cpu"`` or no CUDA) it is gloo, one process per
    ``num_processes_per_machine`` (tools/train_net.py passes ``--num-gpus`` there).
    A single process runs ``main_func`` directly and returns its result.
    """
    _check_launch_args(num_processes_per_machine, num_machines, machine_rank, dist_url)
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        dist_url = "auto" if uses_cuda(device) else f"tcp://127.0.0.1:{_find_free_port()}"
    elif machine_rank == 0:
        check_port_free(dist_url)
    error_dir = tempfile.mkdtemp(prefix="randwire_launch_")
    worker = _Worker(main_func, os.getpid(), error_dir)
    # torch logs "Terminating process ... via signal SIGTERM" for the peers of a failed
    # worker: the failure's own one-line cause is what the user needs
    spawn_logger = logging.getLogger("torch.multiprocessing.spawn")
    spawn_level = spawn_logger.level
    spawn_logger.setLevel(logging.ERROR)
    try:
        with forward_stop_signals() as received:
            try:
                result = _start(worker, num_processes_per_machine, num_machines, machine_rank, dist_url, args,
                                timeout, device, world_size)
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
                stopped = _stop_report(error_dir)
                if stopped is not None or received:  # workers killed by a signal, not failed
                    raise stopped or RunStopped(received[0]) from None
                raise WorkerError(_worker_cause(error_dir, exc, machine_rank * num_processes_per_machine)) from exc
        stopped = _stop_report(error_dir)
        if stopped is not None:
            raise stopped
        return result
    finally:
        spawn_logger.setLevel(spawn_level)
        shutil.rmtree(error_dir, ignore_errors=True)


def _start(worker, num_processes_per_machine, num_machines, machine_rank, dist_url, args, timeout, device,
           world_size):
    if uses_cuda(device):
        from detectron2.engine import launch as d2_launch

        return d2_launch(
            worker,
            num_processes_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// is not a reliable init_method in multi-machine jobs. Prefer tcp://")
    mp.start_processes(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(worker, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )
    return None


def _stop_report(error_dir: str):
    """The :class:`RunStopped` of the lowest rank that reported one (rank 0 wrote the checkpoint)."""
    reports = []
    for name in os.listdir(error_dir):
        if name.startswith("stop."):
            try:
                with open(os.path.join(error_dir, name)) as f:
                    reports.append(json.load(f))
            except (OSError, ValueError):
                continue
    if not reports:
        return None
    first = min(reports, key=lambda r: (r["iteration"] is None, r["rank"] if r["rank"] is not None else 1 << 30))
    return RunStopped(first["signum"], first["iteration"], first["checkpoint"])


# --------------------------------------------------------------------------- worker lifecycle
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Make this process die when ``parent_pid`` (its launcher) does, by any signal.

    Linux: the kernel sends SIGKILL at the parent's death (prctl PR_SET_PDEATHSIG). Also,
    everywhere: a daemon thread polls the parent pid (a dead parent makes us an orphan
    whose ppid changes), which covers systems without prctl."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="randwire-parent-watch", daemon=True).start()


class _Worker:
    """``main_func`` as run in a worker: dies with the launcher; on failure, leaves its
    one-line cause in ``error_dir`` for the launcher (torch only passes a traceback)."""

    def __init__(self, main_func, parent_pid: int, error_dir: str):
        self.main_func = main_func
        self.parent_pid = parent_pid
        self.error_dir = error_dir

    def guard(self) -> None:
        die_with_parent(self.parent_pid)

    def __call__(self, *args):
        self.guard()
        try:
            return self.main_func(*args)
        except RunStopped as stop:  # not a failure: tell the launcher, exit normally
            ignore_stop_signals()
            report = {"rank": _rank(), "signum": stop.signum, "iteration": stop.iteration,
                      "checkpoint": stop.checkpoint}
            with open(os.path.join(self.error_dir, f"stop.{os.getpid()}.json"), "w") as f:
                json.dump(report, f)
            return None
        except Exception as exc:
            path = os.path.join(self.error_dir, f"error.{os.getpid()}.json")
            with open(path, "w") as f:
                json.dump({"rank": _rank(), "message": one_line(exc), "time": time.time()}, f)
            raise


def _rank():
    return comm.get_rank() if dist.is_available() and dist.is_initialized() else None


def _worker_cause(error_dir: str, exc: Exception, first_global_rank: int) -> str:
    """The failed worker's own one-line message (the first one written: later failures of
    its peers are consequences), else torch's description of the failure."""
    reports = []
    for name in os.listdir(error_dir):
        if not name.startswith("error."):
            continue
        try:
            with open(os.path.join(error_dir, name)) as f:
                reports.append(json.load(f))
        except (OSError, ValueError):
            continue
    if reports:
        first = min(reports, key=lambda r: r["time"])
        rank = first["rank"]
        return (f"rank {rank}: " if rank is not None else "") + first["message"]
    index = getattr(exc, "error_index", None)
    rank = f"rank {first_global_rank + index}: " if index is not None else ""
    if isinstance(exc, mp.ProcessExitedException) and exc.exit_code is not None and exc.exit_code < 0:
        name = signal.Signals(-exc.exit_code).name
        return f"{rank}worker process {exc.error_pid} was killed by {name} (out of memory?)"
    return rank + one_line(exc).splitlines()[0][:500]


def _set_local_process_group(num_per_machine: int, machine_rank: int) -> None:
    if getattr(comm, "_LOCAL_PROCESS_GROUP", None) is not None:
        return
    if hasattr(comm, "create_local_process_group"):  # detectron2 HEAD
        comm.create_local_process_group(num_per_machine)
        return
    # detectron2 v0.6: every rank must create every group, in the same order
    for i in range(dist.get_world_size() // num_per_machine):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    if isinstance(main_func, _Worker):
        main_func.guard()  # before the rendezvous, which can wait for minutes
    if "OMP_NUM_THREADS" not in os.environ:
        # N processes on one machine: share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
    run_in_process_group(
        main_func, args, world_size=world_size, global_rank=machine_rank * num_per_machine + local_rank,
        num_per_machine=num_per_machine, machine_rank=machine_rank, dist_url=dist_url, timeout=timeout,
        backend="gloo",
    )


def run_in_process_group(main_func, args, *, world_size, global_rank, num_per_machine, machine_rank, dist_url,
                         timeout=DEFAULT_TIMEOUT, backend="gloo"):
    """In one process of a distributed run (started by us, or by SLURM): join the process
    group (and detectron2's per-machine group), run ``main_func(*args)``, leave the group.
    ``backend`` "nccl": this process drives GPU ``global_rank % num_per_machine``."""
    if backend == "nccl":
        torch.cuda.set_device(global_rank % num_per_machine)
    try:
        dist.init_process_group(
            backend=backend, init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
        )
    except Exception:
        logger.error(f"Process group URL: {dist_url} (rank {global_rank} of {world_size})")
        raise
    _set_local_process_group(num_per_machine, machine_rank)
    comm.synchronize()
    # on failure, no teardown barrier: peers may wait for this rank inside a collective
    # (detectron2 raises on a non-finite loss in rank 0 only); the launcher ends them
    result = main_func(*args)
    shutdown_process_group()
    return result


def shutdown_process_group() -> None:
    """Tear gloo down only once every rank is done with it: a rank destroying its groups
    while a peer still talks to it can abort the peer ("terminate called without an
    active exception")."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        # detectron2 caches its gather and local groups per process: forget them, so a
        # later process group in this process builds fresh ones
        for name in ("_get_global_gloo_group", "create_local_process_group"):
            cached = getattr(comm, name, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()
        comm._LOCAL_PROCESS_GROUP = None
        dist.destroy_process_group()
