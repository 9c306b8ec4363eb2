"""The training DataLoaders' worker processes and stop signals (SIGTERM, SIGUSR1, SIGINT).

A terminal (Ctrl-C) and SLURM signal every process of a run, loader workers included;
torch ends a worker on SIGTERM, and its main process then fails the iteration with "DataLoader
worker killed by signal". The training process stops cleanly on these signals
(``randwire_d2.engine.preemption``) and shuts its loaders down, so the workers ignore them;
they still exit when their main process is gone (torch's watchdog) or terminates them.
"""
import os
import signal
import threading

__all__ = ["STOP_SIGNALS", "loader_worker_init"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _ignore_stop_signals_in_worker():
    """Block the stop signals in this (DataLoader worker) process; a thread takes them: the
    main process's own SIGTERM at shutdown (multiprocessing terminating its daemonic
    children) ends the worker, as torch's handler does; others are ignored."""
    signals = set(STOP_SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    def wait():
        while True:
            info = signal.sigwaitinfo(signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=wait, name="randwire-stop-signals", daemon=True).start()


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the training DataLoaders (picklable, no state)."""
    if hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwaitinfo"):
        _ignore_stop_signals_in_worker()
