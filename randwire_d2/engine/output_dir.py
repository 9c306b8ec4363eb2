"""One writer per OUTPUT_DIR, and no run silently replacing another's results.

* :class:`OutputDirLock`: ``OUTPUT_DIR/randwire_run.lock`` holds the owner's pid, host and
  process start time while a run trains there. A second run is refused while the owner
  lives; a lock left by a run that died (SIGKILL, power loss) is detected as stale on the
  same host (pid gone, or reused by another process) and taken over, saying so. A lock
  from another host cannot be checked: the message says which file to delete.
* :func:`check_existing_results`: a new run (no ``--resume``) in an OUTPUT_DIR that holds
  checkpoints is refused unless ``--overwrite`` is given, which deletes the previous run's
  checkpoints and metrics first.
"""
import glob
import json
import logging
import os
import socket
import time
from typing import Dict, List, Optional

__all__ = ["LOCK_NAME", "OutputDirLock", "RunLockError", "check_existing_results", "lock_owner_status"]

logger = logging.getLogger("randwire_d2")

LOCK_NAME = "randwire_run.lock"
CHECKPOINT_PATTERNS = ("last_checkpoint", "*.pth")
METRIC_FILES = ("metrics.json", "final_metrics.json")


class RunLockError(ValueError):
    """OUTPUT_DIR is held by another (live, or unverifiable) run."""


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_record() -> Dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start_time": _start_time(pid), "since": time.time()}


def lock_owner_status(owner: Dict) -> str:
    """'live', 'stale' (same host, owner gone or pid reused) or 'unknown' (other host)."""
    if owner.get("host") != socket.gethostname():
        return "unknown"
    pid = owner.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return "stale"
    recorded = owner.get("start_time")
    if recorded is not None and _start_time(pid) not in (None, recorded):
        return "stale"  # the pid now belongs to another process
    return "live"


def _describe(owner: Dict) -> str:
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, since {when}"


class OutputDirLock:
    """Exclusive claim on an OUTPUT_DIR for one run (a context manager)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._held = False

    def read_owner(self) -> Optional[Dict]:
        try:
            with open(self.path) as f:
                owner = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        record = _owner_record()
        tmp = f"{self.path}.{record['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)  # atomic: creates the lock, complete, or fails
                    self._held = True
                    return
                except FileExistsError:
                    pass
                owner = self.read_owner()
                if owner is None:
                    continue  # released meanwhile
                status = lock_owner_status(owner)
                if status == "live":
                    raise RunLockError(
                        f"OUTPUT_DIR {self.output_dir!r} is in use by another run ({_describe(owner)}): wait for "
                        "it to finish, stop it, or choose another OUTPUT_DIR."
                    )
                if status == "unknown":
                    raise RunLockError(
                        f"OUTPUT_DIR {self.output_dir!r} is locked by a run on another host ({_describe(owner)}), "
                        f"which cannot be checked from here: if that run is over, delete {self.path}."
                    )
                self._remove_stale(owner)
            raise RunLockError(f"Could not lock OUTPUT_DIR {self.output_dir!r}: {self.path} keeps changing.")
        finally:
            os.remove(tmp)

    def _remove_stale(self, owner: Dict) -> None:
        # move it aside first, so that a lock another process just took is never deleted
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        with open(aside) as f:
            text = f.read()
        try:
            moved = json.loads(text)
        except ValueError:
            moved = {}
        if moved != owner:
            try:
                os.link(aside, self.path)  # not the stale lock we examined: put it back
            except FileExistsError:
                pass
        else:
            logger.warning(
                f"OUTPUT_DIR {self.output_dir!r}: the run that locked it ({_describe(owner)}) is gone; "
                "taking over its stale lock."
            )
        os.remove(aside)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        owner = self.read_owner()
        if owner and owner.get("pid") == os.getpid():
            os.remove(self.path)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _previous_results(output_dir: str) -> List[str]:
    found = []
    for pattern in CHECKPOINT_PATTERNS:
        found += glob.glob(os.path.join(glob.escape(output_dir), pattern))
    return sorted(found)


def check_existing_results(output_dir: str, *, resume: bool, overwrite: bool, weights: str = "") -> None:
    """Refuse a fresh run over a previous run's checkpoints unless ``overwrite``; with
    ``overwrite``, delete those checkpoints and metrics (never MODEL.WEIGHTS itself)."""
    if resume or not os.path.isdir(output_dir):
        return
    previous = _previous_results(output_dir)
    if not previous:
        return
    names = ", ".join(os.path.basename(p) for p in previous[:4]) + (", ..." if len(previous) > 4 else "")
    if not overwrite:
        raise ValueError(
            f"OUTPUT_DIR {output_dir!r} holds checkpoints of a previous run ({names}): pass --resume to continue "
            "it, --overwrite to replace it, or choose another OUTPUT_DIR."
        )
    if weights and os.path.abspath(weights) in {os.path.abspath(p) for p in previous}:
        raise ValueError(
            f"--overwrite would delete MODEL.WEIGHTS {weights!r}: copy it out of OUTPUT_DIR {output_dir!r} first."
        )
    for path in previous + [os.path.join(output_dir, m) for m in METRIC_FILES]:
        if os.path.isfile(path):
            os.remove(path)
    logger.warning(f"--overwrite: deleted the previous run's checkpoints and metrics in {output_dir!r} ({names}).")
