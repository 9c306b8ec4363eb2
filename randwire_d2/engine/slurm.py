"""One training over several SLURM nodes, submitted through submitit.

``tools/train_net.py --launcher slurm --nodes N --gpus-per-node G ...`` (and the lazy
tool) checks the settings on the login node, then submits one job of ``N x G`` tasks
(one process per GPU; with MODEL.DEVICE cpu, G CPU processes per node over gloo). Each
task joins the process group at ``tcp://<first node of the job>:<port from the job id>``
and runs the tool's ``main``. Global rank 0 holds the OUTPUT_DIR lock, recording the
job id: after a requeue (on any node of the job) the lock is the job's own.

Preemption and time limits: submitit's sbatch script asks SLURM for SIGUSR2 shortly before
the time limit; submitit then calls :meth:`DistributedTraining.checkpoint` (a copy of the
job with ``--resume``) and requeues the job, whose tasks SLURM stops with SIGTERM:
:mod:`randwire_d2.engine.preemption` finishes the iteration and checkpoints it, and the requeued
job continues from there. Logs: ``OUTPUT_DIR/submitit/`` (submitit's) and OUTPUT_DIR/log.txt.
"""
import argparse
import copy
import os
import sys
import zlib
from typing import Optional

__all__ = ["DistributedTraining", "add_slurm_arguments", "job_port", "submit"]

PORT_BASE, PORT_RANGE = 20000, 20000


def add_slurm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("SLURM (--launcher slurm, through submitit)")
    group.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: processes on this machine (--num-gpus, --num-machines); slurm: submit one job")
    group.add_argument("--nodes", type=int, default=1, help="SLURM nodes of the job")
    group.add_argument("--gpus-per-node", type=int, default=1,
                       help="processes per node: one per GPU (with MODEL.DEVICE cpu: CPU processes)")
    group.add_argument("--partition", default=None, help="SLURM partition")
    group.add_argument("--time", type=int, default=60 * 24, help="time limit of one job run, minutes")
    group.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per process")
    group.add_argument("--submitit-cluster", default="slurm", choices=("slurm", "local", "debug"),
                       help=argparse.SUPPRESS)  # local/debug: tests
    return parser


def check_slurm_args(args) -> None:
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node), ("--time", args.time)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} {value!r} is invalid: an integer >= 1.")
    if args.submitit_cluster == "local" and args.nodes != 1:
        raise ValueError("--nodes must be 1 with submitit's local executor.")


def job_port(job_id: str) -> int:
    """The rendezvous port of a job: every task computes the same from the job id."""
    return PORT_BASE + zlib.crc32(str(job_id).encode()) % PORT_RANGE


class DistributedTraining:
    """What every task of the job runs: ``main_func(args)`` (a tool's ``main``, e.g.
    :func:`randwire_d2.engine.train_net.main`) in the job's process group."""

    def __init__(self, main_func, args, uses_cuda: bool, output_dir: str):
        self.main_func, self.args, self.uses_cuda, self.output_dir = main_func, args, uses_cuda, output_dir

    def __call__(self):
        import submitit

        from .launch import run_in_process_group
        from .output_dir import OutputDirLock, check_existing_results
        from .preemption import RunStopped

        env = submitit.JobEnvironment()
        job_id = str(env.job_id)
        per_node = env.num_tasks // env.num_nodes
        url = f"tcp://{env.hostnames[0]}:{job_port(job_id)}"
        owns_output = env.global_rank == 0 and not self.args.eval_only
        import randwire_d2  # noqa: F401  (registers backbones, meta-architectures, datasets)

        lock = OutputDirLock(self.output_dir, job_id=job_id) if owns_output else None
        if lock is not None:
            lock.acquire()
        try:
            if lock is not None:  # (--overwrite has been done at submission)
                check_existing_results(self.output_dir, resume=self.args.resume, overwrite=False)
            if "OMP_NUM_THREADS" not in os.environ and not self.uses_cuda:
                import torch

                torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
            return run_in_process_group(
                self.main_func, (self.args,), world_size=env.num_tasks, global_rank=env.global_rank,
                num_per_machine=per_node, machine_rank=env.node, dist_url=url,
                backend="nccl" if self.uses_cuda else "gloo",
            )
        except RunStopped as stop:  # the requeued job resumes from its checkpoint
            print(stop, file=sys.stderr)
            return str(stop)
        finally:
            if lock is not None:
                lock.release()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before a requeue: the same training, resumed."""
        from submitit.helpers import DelayedSubmission

        resumed = copy.copy(self.args)
        resumed.resume = True
        resumed.overwrite = False
        return DelayedSubmission(DistributedTraining(self.main_func, resumed, self.uses_cuda, self.output_dir))


def submit(main_func, args, output_dir: str, uses_cuda: bool, name: Optional[str] = None):
    """Submit ``main_func(args)`` as one job of ``args.nodes x args.gpus_per_node`` tasks;
    returns the submitit job."""
    from ..sweep.runner import make_executor

    check_slurm_args(args)
    params = {
        "nodes": args.nodes,
        "tasks_per_node": args.gpus_per_node,
        "gpus_per_node": args.gpus_per_node if uses_cuda else None,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.time,
        "slurm_partition": args.partition,
        "name": name or os.path.basename(os.path.normpath(output_dir)),
    }
    if args.submitit_cluster != "slurm":
        params = {k: v for k, v in params.items() if k in ("nodes", "tasks_per_node", "timeout_min", "name")}
    executor = make_executor(os.path.join(output_dir, "submitit", "%j"), args.submitit_cluster, params)
    return executor.submit(DistributedTraining(main_func, args, uses_cuda, output_dir))
