"""Stop signals (frontier_jax/train/signals.py) as a scheduler sends them, to CLI processes:

* a run stuck waiting (here: for its first batch) is ended `checkpoint.stop_timeout_s` after
  SIGTERM, and at once by a second signal, with the preempted exit code 75;
* on two processes (jax.distributed on 127.0.0.1), SIGTERM to one of them stops both at the
  same step with one complete checkpoint (without the agreement, one process would enter the
  save's collectives while the other enters the next step's, and both would hang).
* a signal while the command starts (here: loading the config), or during the trainer's setup
  (here: restoring a checkpoint), exits 75 with the `preempted:` line too, and leaves the run
  directory as it was (no half-written file, no lock left behind).
The normal case (save at the current step, exit 75, exact resume) is
test_checkpoint_resume.py's sigterm_run.  Every wait is bounded, so a hang fails the test.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frontier_jax.train.checkpoint import Checkpointer

from .common import REPO, reference_overrides, subprocess_env, tiny_config, tiny_overrides

STUCK_SCRIPT = """
import pathlib, sys, threading
from frontier_jax import cli
from frontier_jax.train import loop

def stuck(batch, sharding):  # the loop waits for its first batch for ever
    pathlib.Path({marker!r}).touch()
    threading.Event().wait()

loop.device_batch = stuck
raise SystemExit(cli.main({argv!r}))
"""


def _start_stuck(tmp_path: Path, name: str, stop_timeout_s: float) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"{name}.waiting"
    argv = [
        "train",
        "--config",
        "model/toy",
        "--run-dir",
        str(tmp_path / name),
        *tiny_overrides(f"checkpoint.stop_timeout_s={stop_timeout_s}"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_SCRIPT.format(marker=str(marker), argv=argv)],
        env=subprocess_env(devices=None),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, marker


def _wait_for(path: Path, procs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        assert all(p.poll() is None for p in procs), "a process ended early:\n" + "\n".join(
            p.communicate()[1][-3000:] for p in procs if p.poll() is not None
        )
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stuck_runs(tmp_path_factory):
    """Two CLI runs stuck waiting for data, started together: `timeout` gets one SIGTERM
    (stop_timeout_s=3), `twice` gets SIGTERM then SIGINT (stop_timeout_s=600).
    {name: (returncode, stderr, seconds from the first signal to the exit)}."""
    tmp_path = tmp_path_factory.mktemp("stuck")
    runs = {"timeout": _start_stuck(tmp_path, "timeout", 3), "twice": _start_stuck(tmp_path, "twice", 600)}
    procs = [proc for proc, _ in runs.values()]
    results = {}
    try:
        for name, (proc, marker) in runs.items():
            _wait_for(marker, procs, timeout=300)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            if name == "twice":
                time.sleep(0.5)
                proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            results[name] = (proc.returncode, err, time.monotonic() - start)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results, tmp_path


def test_a_run_stuck_after_sigterm_ends_after_the_stop_timeout(stuck_runs):
    (code, err, seconds), tmp_path = stuck_runs[0]["timeout"], stuck_runs[1]
    assert code == 75, err[-3000:]
    assert 3 <= seconds < 40, seconds
    assert err.rstrip().endswith(
        "preempted: SIGTERM received but the run did not save and stop within 3 s "
        "(checkpoint.stop_timeout_s); exiting without saving"
    ), err[-3000:]
    assert Checkpointer(tmp_path / "timeout" / "checkpoints", tiny_config().checkpoint).latest_step() is None


def test_a_second_signal_ends_the_run_at_once(stuck_runs):
    code, err, seconds = stuck_runs[0]["twice"]
    assert code == 75, err[-3000:]
    assert seconds < 30  # not the 600 s stop timeout
    assert err.rstrip().endswith("preempted: second signal SIGINT: exiting at once, without saving"), err[
        -3000:
    ]


def test_the_cli_prints_no_library_info_logs(stuck_runs):
    """What a user sees before the first step: the project's messages only (orbax's
    CheckpointManager options and the like only with --verbose)."""
    for code, err, _ in stuck_runs[0].values():
        assert "INFO absl" not in err and "orbax" not in err, err[-3000:]
        assert len(err.splitlines()) <= 3, err[-3000:]


@pytest.mark.slow
# ------------------------------------------------------------------ several processes
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    from tests.parallel.test_multihost import OVERRIDES, _free_port, _start

    run = tmp_path / "run"
    # data parallel over 2 processes x 2 devices: the smallest program with collectives across the
    # processes (a long compile skew between them would time out gloo's first connection, 30 s)
    overrides = OVERRIDES + ["mesh.expert=1", "mesh.data=4", "train.steps=1000", "checkpoint.every=0"]
    logs = {i: tmp_path / f"process_{i}.log" for i in range(2)}
    port = _free_port()
    procs = {i: _start("preempt", logs[i], run, i, 2, port, 2, overrides) for i in range(2)}
    try:
        deadline = time.monotonic() + 400
        while not (
            (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2
        ):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), "\n".join(
                f"--- {i}:\n{logs[i].read_text()[-3000:]}" for i in procs
            )
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGTERM)  # process 1 gets no signal
        for p in procs.values():
            p.wait(timeout=120)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = {i: logs[i].read_text() for i in procs}
    assert [p.returncode for p in procs.values()] == [75, 75], outputs
    saved = [next(line for line in outputs[i].splitlines() if "saved step" in line) for i in procs]
    steps = {int(line.split("saved step ")[1].split()[0]) for line in saved}
    assert len(steps) == 1, saved  # both processes saved the same step
    assert "process 0: SIGTERM received" in saved[0]
    assert "process 1: a stop signal on another process received" in saved[1]
    assert Checkpointer(run / "checkpoints", tiny_config().checkpoint).latest_step() == steps.pop()


# ------------------------------------------------------------------ signals during setup
SIGNAL_IN_SCRIPT = """
import os, signal
from frontier_jax import cli
import {module} as where

original = where.{name}

def signalled(*args, **kwargs):  # the signal arrives while {module}.{name} runs
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

where.{name} = signalled
raise SystemExit(cli.main({argv!r}))
"""


def _run_signalled_in(module: str, name: str, run_dir: Path, devices: int | None, overrides: list[str]):
    argv = ["train", "--config", "model/toy", "--run-dir", str(run_dir), *overrides]
    return subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_SCRIPT.format(module=module, name=name, argv=argv)],
        env=subprocess_env(devices=devices),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_signal_while_the_command_starts_exits_75_with_the_preempted_line(tmp_path):
    done = _run_signalled_in("frontier_jax.config", "load_config", tmp_path / "run", None, tiny_overrides())
    assert done.returncode == 75, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == (
        "preempted: SIGTERM received while starting, before anything was written; run the same command again"
    )
    assert not (tmp_path / "run").exists()


def test_a_signal_during_restore_exits_75_and_leaves_the_run_directory_as_it_was(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    done = _run_signalled_in(
        "frontier_jax.train.checkpoint", "Checkpointer.restore_latest", run_dir, 8, reference_overrides()
    )
    assert done.returncode == 75, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == (
        f"preempted: SIGTERM received during setup, before the first step: nothing was trained or written in "
        f"{run_dir}; run the same command again"
    )
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # no checkpoint moved, config.yaml and metrics.jsonl untouched, no lock left
