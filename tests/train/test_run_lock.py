"""One trainer per run directory (frontier_jax/train/run_lock.py).

* A second `frontier-jax train` on the run directory of a running trainer is refused with one
  `error:` line naming the holder's pid and host, exit 7, before it writes anything (two
  trainers used to both run: metrics.jsonl held their steps twice, one died in orbax).
* kill -9 of the holder leaves its lock file; the next trainer on the host finds its process
  gone and takes the lock (stale), as it does for a recycled pid (same pid, another process).
* A lock of another host cannot be checked: it is refused, naming the host and the file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from frontier_jax import cli
from frontier_jax.train.run_lock import LOCK_NAME, RunLock, RunLockedError

from .common import tiny_overrides
from .test_signals import _start_stuck, _wait_for


def test_second_trainer_is_refused_naming_the_holder_and_a_killed_holder_leaves_a_stale_lock(
    tmp_path, capsys, caplog
):
    holder, waiting = _start_stuck(tmp_path, "run", stop_timeout_s=600)  # locked, waits for its first batch
    run_dir = tmp_path / "run"
    try:
        _wait_for(waiting, [holder], timeout=300)
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        argv = ["train", "--config", "model/toy", "--run-dir", str(run_dir), *tiny_overrides("train.steps=2")]
        assert cli.main(argv) == cli.EXIT_LOCKED
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(
            f"error: run directory {run_dir} is in use by another trainer"
        )
        assert f"(pid {holder.pid} on host {socket.gethostname()}, since " in err
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing written
    finally:
        holder.kill()  # SIGKILL: no clean-up
        holder.communicate(timeout=60)
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid
    logger = logging.getLogger("frontier_jax.train.run_lock")
    logger.addHandler(caplog.handler)  # (the CLI above configured logging with force=True)
    try:
        with RunLock.acquire(run_dir) as lock:
            assert json.loads((run_dir / LOCK_NAME).read_text()) == lock.holder
    finally:
        logger.removeHandler(caplog.handler)
    assert f"replacing the stale lock of pid {holder.pid} on host" in caplog.text
    assert not (run_dir / LOCK_NAME).exists()  # released when the block ends


def _write_lock(run_dir, **holder):
    (run_dir / LOCK_NAME).write_text(json.dumps({"started": "2026-12-07T10:00:00+00:00", **holder}))


def test_a_recycled_pid_is_a_stale_lock_and_a_live_one_is_not(tmp_path):
    me = RunLock.acquire(tmp_path).holder  # this process, with its start time
    (tmp_path / LOCK_NAME).unlink()
    _write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), pid_start=me["pid_start"])
    with pytest.raises(RunLockedError, match=rf"\(pid {os.getpid()} on host "):
        RunLock.acquire(tmp_path)
    # the same pid, started at another time: another process that got the pid
    _write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), pid_start=me["pid_start"] - 1)
    RunLock.acquire(tmp_path).release()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    _write_lock(tmp_path, pid=int(dead.stdout), host=socket.gethostname(), pid_start=None)
    RunLock.acquire(tmp_path).release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_refused_naming_the_host_and_the_file(tmp_path):
    _write_lock(tmp_path, pid=4242, host="node-17", pid_start=1)
    with pytest.raises(RunLockedError) as err:
        RunLock.acquire(tmp_path)
    assert str(err.value) == (
        f"run directory {tmp_path} is locked by a trainer of another host (pid 4242 on host node-17, since "
        f"2026-12-07T10:00:00+00:00): use another --run-dir, or if that run is gone, delete {tmp_path / LOCK_NAME}"
    )


def test_a_file_that_is_not_a_lock_is_refused_not_overwritten(tmp_path):
    (tmp_path / LOCK_NAME).write_text("hello")
    with pytest.raises(RunLockedError, match=r"is not a trainer's lock \('hello'\): if no trainer runs in"):
        RunLock.acquire(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == "hello"


def test_the_lock_is_not_released_for_another_holder(tmp_path):
    lock = RunLock.acquire(tmp_path)
    _write_lock(tmp_path, pid=4242, host="node-17", pid_start=1)  # (someone replaced it)
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "node-17"
