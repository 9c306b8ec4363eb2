"""Multi-process launch for training on GPUs (NCCL, through detectron2) and on CPUs (gloo).

detectron2's ``launch`` spawns one worker per GPU and, in v0.6, asserts CUDA in every
worker and always uses NCCL. :func:`launch` keeps its signature and behaviour on GPUs
and adds the CPU path: ``num_processes_per_machine`` workers started with
``torch.multiprocessing``, a gloo process group initialised here, and detectron2's
per-machine ("local") process group set up as detectron2 does (``comm.create_local_process_group``
at HEAD, ``comm._LOCAL_PROCESS_GROUP`` in v0.6), so ``comm.get_local_rank()`` works.

Multi-machine: call it on every machine with the same ``num_machines`` and ``dist_url``
(``tcp://HOST:PORT`` of machine 0) and that machine's ``machine_rank``.
"""
import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch", "uses_cuda"]

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
    if uses_cuda(device):
        from detectron2.engine import launch as d2_launch

        return d2_launch(
            main_func,
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
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


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
    global_rank = machine_rank * num_per_machine + local_rank
    if "OMP_NUM_THREADS" not in os.environ:
        # N processes on one machine: share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
    try:
        dist.init_process_group(
            backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
        )
    except Exception:
        logger.error(f"Process group URL: {dist_url} (rank {global_rank} of {world_size})")
        raise
    try:
        _set_local_process_group(num_per_machine, machine_rank)
        comm.synchronize()
        main_func(*args)
    finally:
        shutdown_process_group()


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
