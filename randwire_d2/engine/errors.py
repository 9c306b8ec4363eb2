"""One-line errors for the command line.

A run that fails prints one ``error:`` line with the cause; the traceback goes to the
log file (and to the console with ``RANDWIRE_DEBUG=1``).

* :class:`TrainingError`: raised by the trainer around an exception during training,
  naming the iteration and the last good checkpoint.
* :class:`WorkerError`: a worker process of a multi-process run failed; carries that
  worker's one-line message to the launching process.
"""
import logging
import os
import re
import sys

__all__ = ["TrainingError", "WorkerError", "debug_enabled", "hide_console_tracebacks", "log_failure", "one_line"]

DEBUG_ENV = "RANDWIRE_DEBUG"
CONSOLE_LOGGERS = ("detectron2", "fvcore", "randwire_d2")


class TrainingError(RuntimeError):
    """An exception during training, with the iteration where it happened."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


class WorkerError(RuntimeError):
    """A worker process of a multi-process run failed (message: that worker's cause)."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.\s*\nOriginal Traceback")


def _worker_inner_cause(text: str):
    """torch re-raises a DataLoader worker's exception with the worker's whole traceback as
    its message: the inner cause is its last line, ``module.Type: message``."""
    match = _WORKER_ERROR.match(text)
    if not match:
        return None
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    type_name, _, message = last.partition(": ")
    return type_name.rsplit(".", 1)[-1], message or type_name


def one_line(exc: BaseException) -> str:
    """The exception's message as one line; foreign exceptions are prefixed by their type.
    An exception from a DataLoader worker becomes the worker's own one-line cause."""
    inner = _worker_inner_cause(str(exc))
    if inner is not None:
        type_name, message = inner
        ours = type_name in ("DataError", "TrainingError", "WorkerError", "ValueError", "FileNotFoundError")
        return message if ours else f"{type_name}: {message}"
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, KeyError) and text.startswith(("'", '"')) and text.endswith(("'", '"')):
        text = text[1:-1]  # KeyError quotes its message
    # validation errors name the key, file or value: their type adds nothing
    plain = (TrainingError, WorkerError, ValueError, FileNotFoundError)
    if isinstance(exc, plain) or type(exc).__module__.startswith("randwire_d2") or text.startswith("Non-existent config key"):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _no_traceback(record: logging.LogRecord) -> bool:
    return record.exc_info is None and not record.exc_text


def _is_console(handler: logging.Handler) -> bool:
    # detectron2 logs to its file through a plain StreamHandler: tell them apart by the stream
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    name = getattr(handler.stream, "name", None)
    return not (isinstance(name, str) and os.path.isfile(name))


def hide_console_tracebacks() -> None:
    """Keep tracebacks (e.g. detectron2's "Exception during training:") out of the console
    handlers; file handlers still get them. No-op with RANDWIRE_DEBUG=1."""
    if debug_enabled():
        return
    for name in CONSOLE_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if _is_console(handler) and _no_traceback not in handler.filters:
                handler.addFilter(_no_traceback)


def log_failure(exc: BaseException) -> None:
    """The traceback of a failed run into the log file (console handlers drop it); the
    training loop's own exceptions are logged by detectron2 already."""
    log = logging.getLogger("randwire_d2")
    if log.handlers and not isinstance(exc, TrainingError):
        log.error(f"Run failed: {one_line(exc)}", exc_info=exc)


def error_line(exc: BaseException) -> str:
    """The one line a tool prints for a failed run."""
    where = " (traceback: RANDWIRE_DEBUG=1"
    if isinstance(exc, (TrainingError, WorkerError)):
        where += ", or OUTPUT_DIR/log.txt"
    return f"error: {one_line(exc)}{where})"


def run_command(launch_from_args, args) -> None:
    """A tool's ``launch_from_args(args)`` as a command line: one line and exit status 1 on
    a failure (the traceback with RANDWIRE_DEBUG=1), one line and 128 + signal on a stop."""
    from .preemption import RunStopped, ignore_stop_signals  # preemption pulls in torch.distributed

    try:
        launch_from_args(args)
    except RunStopped as stop:
        ignore_stop_signals()
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except Exception as exc:
        if debug_enabled():
            raise
        sys.exit(error_line(exc))
