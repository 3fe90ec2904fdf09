"""One trainer per run directory: an exclusive lock file `run_dir/run.lock`.

The file holds its holder as JSON: {"pid", "host", "started" (ISO time), "pid_start"}, where
pid_start is the kernel's start time of that process (Linux: field 22 of /proc/<pid>/stat, None
elsewhere), so that a recycled pid is not taken for the holder.

Taking it (`RunLock.acquire`), under an flock of the run directory so that two trainers starting
together on one host decide one after the other:
- no lock file: write ours;
- a lock of a process that runs (same host, same pid and pid_start): refused, `RunLockedError`
  naming its pid and host;
- a lock of a process of this host that no longer runs (killed with -9, power loss): stale,
  replaced with a warning;
- a lock of another host: whether its process runs cannot be told from here, so it is refused,
  naming the host and the file to delete if that run is gone.
Releasing it (`release`, or leaving the `with` block) removes the file if it is still ours.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

LOCK_NAME = "run.lock"
log = logging.getLogger(__name__)


class RunLockedError(Exception):
    """Another trainer holds the run directory (or may: a lock of another host)."""


def _pid_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name (field 2) may hold spaces


def _runs(pid: int, pid_start: int | None) -> bool:
    """Whether process `pid` of this host runs and is the one that started at `pid_start`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        pass
    now = _pid_start(pid)
    return pid_start is None or now is None or now == pid_start


@contextlib.contextmanager
def _one_at_a_time(directory: Path):
    """An flock of `directory` while a trainer checks and writes the lock file."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


class RunLock:
    """The lock of one run directory, held by this process (see the module docstring)."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Takes `run_dir`'s lock (the directory must exist); raises `RunLockedError`."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "pid_start": _pid_start(os.getpid()),
        }
        with _one_at_a_time(run_dir):
            holder = _read(path)
            if holder is not None:
                where = f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"
                if holder.get("host") != me["host"]:
                    raise RunLockedError(
                        f"run directory {run_dir} is locked by a trainer of another host ({where}): "
                        f"use another --run-dir, or if that run is gone, delete {path}"
                    )
                if _runs(holder["pid"], holder.get("pid_start")):
                    raise RunLockedError(
                        f"run directory {run_dir} is in use by another trainer ({where}): wait for it "
                        "to end or stop it, or use another --run-dir"
                    )
                log.warning(
                    "%s: replacing the stale lock of %s (that process no longer runs)", run_dir, where
                )
            partial = path.with_name(f"{LOCK_NAME}.{me['pid']}.tmp")
            partial.write_text(json.dumps(me) + "\n")
            os.replace(partial, path)  # the file appears whole
        return cls(path, me)

    def release(self) -> None:
        """Removes the lock file if it is still this process's."""
        try:
            ours = _read(self.path) == self.holder
        except RunLockedError:  # overwritten by something else: not ours to remove
            ours = False
        if ours:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: Path) -> dict | None:
    """The holder recorded in the lock file `path`, None when there is none.  A file that is not
    a holder record (not JSON, no pid) is refused: it names no process to check."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        valid = isinstance(holder["pid"], int)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise RunLockedError(
            f"{path} is not a trainer's lock ({text[:80]!r}): if no trainer runs in {path.parent}, delete it"
        )
    return holder
