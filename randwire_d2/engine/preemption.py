"""Stopping a run cleanly on SIGTERM, SIGUSR1 or SIGINT (SLURM preemption and time limits,
``timeout``, Ctrl-C).

* Every training process handles them (:func:`stop_on_signals`): the signal only sets a
  flag; the current iteration finishes, then :class:`StopHook` (the last hook) has all
  ranks agree on stopping at that same iteration, writes the checkpoint of that iteration
  (atomic, with the exact-resume state of a periodic checkpoint), logs and raises
  :class:`RunStopped`, whose message is the one line the tools print:
  ``stopped by SIGTERM at iteration N: checkpoint <path>; continue with --resume``. The
  exit code follows the shell convention 128 + signal (SIGTERM 143, SIGINT 130).
* Before the training loop runs (setup, evaluation-only runs) a signal stops at once.
* Further signals while stopping are ignored: checkpoints are written through a temp file
  and a rename, so even SIGKILL cannot leave a truncated one.
* The launcher of a multi-process run forwards the signals to its workers
  (:func:`forward_stop_signals`) and reports their :class:`RunStopped`.
* DataLoader workers of the training loader (:func:`randwire_d2.data.workers.loader_worker_init`) ignore these
  signals, which a terminal or SLURM sends to every process: their main process stops
  them after its checkpoint (detectron2's loader would otherwise see a killed worker in
  the middle of the iteration). They still exit when their main process is gone.
"""
import contextlib
import logging
import os
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.workers import STOP_SIGNALS

__all__ = [
    "STOP_EXIT_CODES",
    "STOP_SIGNALS",
    "RunStopped",
    "StopHook",
    "forward_stop_signals",
    "ignore_stop_signals",
    "stop_on_signals",
    "stop_requested",
]

logger = logging.getLogger("randwire_d2")

STOP_EXIT_CODES = frozenset(128 + s for s in STOP_SIGNALS)  # a tool's exit code after RunStopped


class RunStopped(BaseException):
    """The run stopped on a signal. A BaseException, like KeyboardInterrupt: it is not a
    failure (detectron2's loop logs every Exception as "Exception during training")."""

    def __init__(self, signum: int, iteration: Optional[int] = None, checkpoint: Optional[str] = None):
        super().__init__(signum, iteration, checkpoint)
        self.signum, self.iteration, self.checkpoint = int(signum), iteration, checkpoint

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        if self.iteration is None:
            return f"stopped by {self.signal_name} before any training iteration finished: nothing was saved"
        return (
            f"stopped by {self.signal_name} at iteration {self.iteration}: checkpoint {self.checkpoint}; "
            "continue with --resume"
        )


class _State:
    owner: Optional[int] = None  # pid of the process whose handlers these are
    signum: Optional[int] = None  # the first stop signal received
    training = False  # inside the training loop: stop after the iteration, not at once


_state = _State()


def ignore_stop_signals() -> None:
    """For a process leaving after :class:`RunStopped`: a terminal or SLURM often sends a
    second signal (SIGTERM then SIGINT/SIGKILL), which must not turn a clean exit into a
    KeyboardInterrupt traceback while the process joins its children."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def stop_requested() -> Optional[int]:
    """The stop signal this process received, if any."""
    return _state.signum


def _handler(signum, frame):
    if os.getpid() != _state.owner:  # a forked child that inherited the handler
        return
    if _state.signum is not None:
        return  # already stopping: a second signal changes nothing
    _state.signum = signum
    if not _state.training:
        raise RunStopped(signum)
    logger.warning(f"{signal.Signals(signum).name} received: stopping after the current iteration.")


@contextlib.contextmanager
def stop_on_signals():
    """Handle :data:`STOP_SIGNALS` in this process for the duration of the block (main
    thread only; elsewhere, and nested, a no-op); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread() or _state.owner == os.getpid():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _state.owner, _state.signum, _state.training = os.getpid(), None, False
    for s in STOP_SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _state.owner, _state.training = None, False


def _agreed_signal() -> int:
    """The largest stop signal any rank received (0: none), the same on every rank."""
    signum = _state.signum or 0
    if comm.get_world_size() == 1:
        return signum
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([signum], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class StopHook(HookBase):
    """Register last: after each iteration (and its evaluation, logging and periodic
    checkpoint), stop if any rank received a stop signal, checkpointing that iteration."""

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer

    def before_train(self):
        _state.training = True

    def after_train(self):
        _state.training = False

    def after_step(self):
        signum = _agreed_signal()
        if not signum:
            return
        _state.training = False  # the checkpoint is the last thing this run does
        iteration = self.trainer.iter
        name = f"model_{iteration:07d}"
        self.checkpointer.save(name, iteration=iteration)
        comm.synchronize()  # every rank waits for rank 0's checkpoint
        stopped = RunStopped(signum, iteration, os.path.join(self.checkpointer.save_dir, name + ".pth"))
        logger.warning(str(stopped))
        raise stopped


# --------------------------------------------------------------------------- launcher side
@contextlib.contextmanager
def forward_stop_signals():
    """In a launcher: pass stop signals on to its worker processes (which handle them as
    above); yields a list that holds the signals received."""
    import multiprocessing

    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def forward(signum, frame):
        received.append(signum)
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except (ProcessLookupError, TypeError):
                pass

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, forward)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
