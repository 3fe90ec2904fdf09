"""Checkpoint integrity (frontier_jax/runtime/integrity.py with train/checkpoint.py): every step
carries checksums.json (size and SHA-256 of each of its files) written after the save commits;
a bit flip or truncation anywhere in a step is named by file, the step is moved aside and the
previous one restored; a step without checksums after checksummed ones is corrupt, a run written
before checksums restores with one "unverified" warning; `frontier-jax checkpoint verify`.  And
the CLI's one-line errors of a save that hits a full disk (in process; the whole CLI run in a
child process is `slow`) and of a run where no step restores.

The reference for the digests is hashlib over each file's bytes read whole; the reference for
"restored the right step" is the saved value itself (the small pytree of test_checkpoint.py)."""

from __future__ import annotations

import asyncio
import errno
import gc
import glob
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization

from frontier_jax import cli
from frontier_jax.config import CheckpointConfig
from frontier_jax.runtime.integrity import MANIFEST, CheckpointError, verify_step
from frontier_jax.train.checkpoint import Checkpointer

from .common import REF_EVERY, run_python, tiny_overrides
from .test_checkpoint import _iterator, _restore_latest, _saved_run, _state

N = REF_EVERY


def _state_data_file(step_dir) -> str:
    """The largest file of the state item (orbax's array data), relative to the step directory."""
    path = max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)
    return os.path.relpath(path, step_dir)


def _flip_bit(path, fraction: float, bit: int = 4) -> None:
    """Flips one bit of the byte at `fraction` of the file (0: the first byte, 1: the last)."""
    raw = bytearray(open(path, "rb").read())
    raw[min(int(len(raw) * fraction), len(raw) - 1)] ^= 1 << bit
    open(path, "wb").write(bytes(raw))


def test_checksums_list_every_file_of_the_step_with_its_sha256(tmp_path):
    _saved_run(tmp_path, steps=(1, 2))
    for step in (1, 2):
        step_dir = tmp_path / str(step)
        manifest = json.loads((step_dir / MANIFEST).read_text())
        on_disk = {
            os.path.relpath(os.path.join(d, f), step_dir)
            for d, _, files in os.walk(step_dir)
            for f in files
            if f != MANIFEST
        }
        assert set(manifest["files"]) == on_disk
        assert {name.split("/")[0] for name in on_disk} >= {"state", "config", "data"}  # every item
        for name, listed in manifest["files"].items():
            raw = (step_dir / name).read_bytes()
            assert listed == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}, name
        assert manifest["step"] == step and manifest["algorithm"] == "sha256"


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0], ids=["first_byte", "middle", "last_byte"])
def test_a_bit_flip_in_any_file_of_a_step_is_named_by_its_checksums(tmp_path, fraction):
    """One flipped bit at the start, middle or end of each item's files (array data, array
    metadata, run config, data-iterator state, orbax's step metadata): corrupt, naming the file;
    the same file flipped back verifies again."""
    _saved_run(tmp_path, steps=(1,))
    step_dir = tmp_path / "1"
    assert verify_step(tmp_path, 1).status == "ok"
    for name in (
        _state_data_file(step_dir),
        "state/_METADATA",
        "config/metadata",
        "data/process_0-of-1.json",
        "_CHECKPOINT_METADATA",
    ):
        _flip_bit(step_dir / name, fraction)
        verdict = verify_step(tmp_path, 1)
        assert (verdict.status, verdict.reason) == ("corrupt", "checksum"), name
        assert verdict.detail.startswith(f"{name} does not match its sha256 in checksums.json"), verdict
        _flip_bit(step_dir / name, fraction)
        assert verify_step(tmp_path, 1).status == "ok", name
    with open(step_dir / "config" / "metadata", "r+b") as f:
        f.truncate(3)
    assert verify_step(tmp_path, 1).detail.startswith("config/metadata has 3 bytes, checksums.json says ")


def test_a_bit_flip_in_a_state_file_moves_the_step_aside_and_restores_the_previous(tmp_path, caplog):
    """A flipped bit in the middle of the array data of the latest step used to restore without a
    word (other values); now the step is moved aside as corrupt and step 2 restores."""
    iterator_states = _saved_run(tmp_path)
    name = _state_data_file(tmp_path / "3")
    _flip_bit(tmp_path / "3" / name, 0.5)
    (step, state), data_state = _restore_latest(tmp_path)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["noise"]), np.asarray(_state(2)["noise"]))
    assert data_state == iterator_states[1]
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt-checksum"]
    warning = next(r.getMessage() for r in caplog.records if "checkpoint 3" in r.getMessage())
    assert f"({name} does not match its sha256 in checksums.json" in warning
    assert f"moved to {tmp_path}/3.corrupt-checksum; resuming from step 2" in warning


def test_every_corrupt_step_passed_over_is_moved_aside(tmp_path, caplog):
    _saved_run(tmp_path)
    _flip_bit(tmp_path / "3" / "data" / "process_0-of-1.json", 0.5)
    _flip_bit(tmp_path / "2" / _state_data_file(tmp_path / "2"), 0.25)
    (step, _), _ = _restore_latest(tmp_path)
    assert step == 1
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt-checksum", "3.corrupt-checksum"]
    moved = [r.getMessage() for r in caplog.records if "moved to" in r.getMessage()]
    assert len(moved) == 2 and all("resuming from step 1" in m for m in moved)


def test_a_step_without_checksums_after_checksummed_ones_is_corrupt(tmp_path, caplog):
    """A process that died between the commit and its checksums: the step cannot be trusted."""
    _saved_run(tmp_path)
    (tmp_path / "3" / MANIFEST).unlink(missing_ok=True)
    (step, _), _ = _restore_latest(tmp_path)
    assert step == 2
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt-missing-checksums"]
    assert any("no checksums.json, although step 2 has one" in r.getMessage() for r in caplog.records)


def test_a_run_written_before_checksums_restores_with_one_unverified_warning(tmp_path, caplog):
    _saved_run(tmp_path)
    for step in (1, 2, 3):
        (tmp_path / str(step) / MANIFEST).unlink(missing_ok=True)
    (step, state), _ = _restore_latest(tmp_path)
    assert step == 3
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 8), 3.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"checkpoint 3 in {tmp_path} is unverified: no checksums.json: written before checkpoints "
        "were checksummed"
    ]
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


def test_checkpoint_verify_prints_every_step_and_exits_5_when_one_is_corrupt(tmp_path, capsys):
    _saved_run(tmp_path / "run" / "checkpoints")
    steps = tmp_path / "run" / "checkpoints"
    (steps / "1" / MANIFEST).unlink(missing_ok=True)  # as written before checksums: no earlier step has them
    name = _state_data_file(steps / "3")
    _flip_bit(steps / "3" / name, 0.5)
    assert cli.main(["checkpoint", "verify", str(tmp_path / "run")]) == 5
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "step 1: unverified (no checksums.json: written before checkpoints were checksummed)"
    assert out[1] == "step 2: ok"
    assert out[2].startswith(f"step 3: corrupt ({name} does not match its sha256 in checksums.json (")
    assert out[3] == f"3 steps in {steps}: 1 ok, 1 corrupt, 1 unverified"
    assert cli.main(["checkpoint", "verify", str(steps / "2")]) == 0
    assert capsys.readouterr().out == f"step 2: ok\n1 step in {steps}: 1 ok, 0 corrupt, 0 unverified\n"


# ------------------------------------------------------------------ the CLI: one line, no tracebacks
def _stderr_lines(proc) -> list[str]:
    """stderr without the progress bar's lines."""
    return [
        line
        for line in proc.stderr.replace("\r", "\n").splitlines()
        if line and not line.startswith("train:")
    ]


DISK_FULL_SCRIPT = """
import asyncio, errno, sys
from orbax.checkpoint._src.serialization import serialization
from frontier_jax import cli

write, failed = serialization.async_serialize_from_host, []

async def disk_full(*args, **kwargs):  # an array's write (tensorstore), in orbax's asyncio loop
    if not failed:  # the first array of the first save: the disk fills while it is being written
        failed.append(asyncio.ensure_future(write(*args, **kwargs)))
        await asyncio.sleep(0)
        raise OSError(errno.ENOSPC, "No space left on device")
    return await write(*args, **kwargs)

serialization.async_serialize_from_host = disk_full
sys.exit(cli.main(["train", "--config", "model/toy", "--run-dir", {run!r}, *{overrides!r}]))
"""


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")  # as the CLI does
def test_a_full_disk_during_a_save_is_a_checkpoint_error_and_no_traceback(tmp_path, monkeypatch, capfd):
    """The fast case of the CLI test below, in process: with the CLI's logging set up (and
    Python's own unraisable hook, as in a CLI process), ENOSPC from an array write under way
    (patched into orbax's write path) is a CheckpointError naming the directory, and the writes
    still in flight when orbax closed its asyncio loop print nothing (they used to print an
    "Event loop is closed" traceback each)."""
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    cli._configure_logging(False)
    write, failed = serialization.async_serialize_from_host, []

    async def disk_full(*args, **kwargs):
        if not failed:  # the first array: the disk fills while it is being written
            failed.append(asyncio.ensure_future(write(*args, **kwargs)))
            await asyncio.sleep(0)
            raise OSError(errno.ENOSPC, "No space left on device")
        return await write(*args, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", disk_full)
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep=10, async_save=True))
    with pytest.raises(CheckpointError, match=rf"saving checkpoint 1 in {tmp_path} failed \(.*No space left"):
        checkpointer.save(1, _state(1), _iterator(), {"model": {}})
        checkpointer.wait()
    time.sleep(1)  # the in-flight writes finish after orbax closed its loop
    gc.collect()
    assert capfd.readouterr().err == ""


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_error_line(reference_run, tmp_path):
    """ENOSPC from an array write of the save of step 1 (patched into orbax's write path, in its
    asyncio loop) while the write is under way: the writes still in flight when orbax closed its
    loop used to print ~40 "Event loop is closed" tracebacks before the error line.  (That a
    failed save leaves the previous checkpoint the latest: test_loop_faults.py.)"""
    run = tmp_path / "run"
    code = DISK_FULL_SCRIPT.format(
        run=str(run), overrides=tiny_overrides("train.steps=1", "checkpoint.every=1")
    )
    proc = run_python(code, timeout=400)
    lines = _stderr_lines(proc)
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: saving checkpoint 1 in {run / 'checkpoints'} failed (")
    assert "No space left on device); no checkpoint is kept." in lines[0]


NO_RESTORE_SCRIPT = """
import sys
from frontier_jax import cli
sys.exit(cli.main(["train", "--config", "model/toy", "--run-dir", {run!r}, *{overrides!r}]))
"""


def test_a_run_where_no_checkpoint_restores_is_one_error_line(reference_run, tmp_path):
    """A step written before checksums, its array files truncated: orbax's failed reads used to
    print "Exception ignored in: <coroutine ...>" tracebacks before the error line."""
    run = tmp_path / "run"
    step_dir = run / "checkpoints" / str(N)
    shutil.copytree(reference_run / "checkpoints" / str(N), step_dir)
    (step_dir / MANIFEST).unlink(missing_ok=True)
    for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
        with open(path, "r+b") as f:
            f.truncate(100)
    code = NO_RESTORE_SCRIPT.format(run=str(run), overrides=tiny_overrides(f"train.steps={N}"))
    proc = run_python(code, timeout=300)
    lines = [line for line in _stderr_lines(proc) if not line.startswith("WARNING")]
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(
        f"error: no checkpoint in {run / 'checkpoints'} restores; the latest, step {N}"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [str(N)]  # nothing moved
