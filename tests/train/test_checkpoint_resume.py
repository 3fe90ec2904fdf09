"""Checkpoints and resume of the training loop (frontier_jax/train/loop.py, checkpoint.py).

Every run here uses the shared tiny configuration on the 8 test devices and is compared with
the shared uninterrupted reference run (conftest.py `reference_run`).  Its lr schedule does
not depend on `train.steps`, so step k of any run is comparable with step k of the reference;
same program, same devices, same data: the comparisons are bitwise.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from frontier_jax.config import load_config
from frontier_jax.train import loop
from frontier_jax.train.checkpoint import Checkpointer
from frontier_jax.train.loop import NonFiniteLossError, train

from .common import (
    REF_EVERY,
    REF_STEPS,
    REPO,
    assert_trees_equal,
    cli_train_command,
    computed_metrics,
    read_metrics,
    restore_checkpoint,
    run_python,
    subprocess_env,
    tiny_config,
    tiny_overrides,
)

N = REF_EVERY  # checkpoint interval of the split runs


def _assert_metrics_match_reference(records, reference_dir):
    ref = {r["step"]: computed_metrics(r) for r in read_metrics(reference_dir)}
    assert records, "no metrics"
    for record in records:
        assert computed_metrics(record) == ref[record["step"]], f"step {record['step']}"


# ------------------------------------------------------------------ exact resume
@pytest.mark.slow
def test_exact_resume_in_process(reference_run, tmp_path):
    """train() N steps, then a fresh train() on the same run_dir to 2N: every logged metric
    (loss, grad norm, lr, loads, biases' range, data stats) and the final state are bitwise
    those of the straight run."""
    run = tmp_path / "run"
    first = train(tiny_config(f"train.steps={N}", f"checkpoint.every={N}"), run, progress=False)
    assert [r["step"] for r in first] == list(range(1, N + 1))
    assert Checkpointer(run / "checkpoints", tiny_config().checkpoint).latest_step() == N
    second = train(tiny_config(f"train.steps={2 * N}", f"checkpoint.every={N}"), run, progress=False)
    assert [r["step"] for r in second] == list(range(N + 1, 2 * N + 1))
    _assert_metrics_match_reference(first + second, reference_run)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 2 * N + 1))

    cfg = tiny_config()
    state, data_state = restore_checkpoint(run, 2 * N, cfg)
    ref_state, ref_data_state = restore_checkpoint(reference_run, 2 * N, cfg)
    assert_trees_equal(state, ref_state, "state")
    assert int(state.step) == 2 * N
    assert data_state == ref_data_state  # the input pipeline resumed at the same position

    # a third call with the same length has nothing left to do
    assert train(tiny_config(f"train.steps={2 * N}"), run, progress=False) == []
    assert len(read_metrics(run)) == 2 * N


def test_resume_refuses_a_different_model(reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / str(N), run / "checkpoints" / str(N))
    with pytest.raises(ValueError, match=r"model\.hidden_size: checkpoint 32 vs config 48"):
        train(tiny_config("model.hidden_size=48"), run, progress=False)
    with pytest.raises(ValueError, match=r"model\.n_routed_experts") as err:
        train(tiny_config("model.n_routed_experts=8", "model.n_group=2"), run, progress=False)
    assert "model.hidden_size" not in str(err.value)  # only the differing fields are named
    assert not (run / "metrics.jsonl").exists() or not read_metrics(run)


# ---------------------------------------------------------------------- SIGTERM
def _wait_for_lines(path, count, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        if path.exists() and len([line for line in path.read_text().splitlines() if line.strip()]) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {count} lines in {timeout}s")


@pytest.fixture(scope="module")
def sigterm_run(reference_run, tmp_path_factory):
    """The CLI run of REF_STEPS steps (no periodic checkpoints) sent SIGTERM once it has logged
    two steps, then the same command again.  (run_dir, output of the first, (last logged
    step, latest checkpoint) after it, CompletedProcess of the second)."""
    run = tmp_path_factory.mktemp("sigterm") / "run"
    command = cli_train_command(run, f"train.steps={REF_STEPS}", "checkpoint.every=0")
    proc = subprocess.Popen(
        command, env=subprocess_env(8), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for_lines(run / "metrics.jsonl", 2, proc, timeout=600)
        assert proc.poll() is None, "the run ended before it could be signalled:\n" + proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out  # EX_TEMPFAIL: preempted, run again (not "done")
    stopped_at = read_metrics(run)[-1]["step"]
    latest = Checkpointer(run / "checkpoints", tiny_config().checkpoint).latest_step()
    again = subprocess.run(
        command, env=subprocess_env(8), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    return run, out, (stopped_at, latest), again


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly_then_resume_matches(sigterm_run, reference_run):
    run, out, (stopped_at, latest), again = sigterm_run
    assert stopped_at < REF_STEPS, "the signal arrived too late to test anything"
    assert latest == stopped_at  # the checkpoint of the step at which the signal arrived
    assert f"preempted: SIGTERM received: saved step {stopped_at} in " in out and "done:" not in out
    assert "INFO absl" not in out and "orbax" not in out.replace(
        str(run), ""
    )  # library INFO only with --verbose
    state, _ = restore_checkpoint(run, stopped_at, tiny_config())
    assert int(state.step) == stopped_at
    ref_state, _ = restore_checkpoint(reference_run, REF_STEPS, tiny_config())

    assert again.returncode == 0, again.stdout + again.stderr
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, REF_STEPS + 1))  # resumed, nothing repeated
    _assert_metrics_match_reference(records, reference_run)
    assert f"done: step {REF_STEPS}" in again.stdout
    final, _ = restore_checkpoint(run, REF_STEPS, tiny_config())
    assert_trees_equal(final, ref_state, "final ")


@pytest.mark.slow
def test_cli_resume_says_where_it_resumed(sigterm_run):
    """The resumed CLI run reports where it resumed: the CLI's train command sets up INFO logging for the
    loop's "resumed from step N in DIR" line."""
    _, _, (stopped_at, _), again = sigterm_run
    assert again.returncode == 0
    reported = f"resumed from step {stopped_at}" in again.stderr
    assert reported, (
        "no 'resumed from step N' line: logging.basicConfig(level=INFO) in cli._train "
        "is a no-op once an import (absl via orbax) has configured the root logger; stderr "
        "tail:\n" + again.stderr[-600:]
    )


# ----------------------------------------------------------------- crash safety
CRASH_SCRIPT = """
import os, sys
from frontier_jax.config import load_config
from frontier_jax.train import loop
from frontier_jax.train.checkpoint import Checkpointer

original = Checkpointer.save
def save(self, step, *args, **kwargs):
    original(self, step, *args, **kwargs)  # asynchronous: returns with the write in flight
    if step == {crash_step}:
        os._exit(1)
Checkpointer.save = save
loop.train(load_config("model/toy", {overrides!r}), {run!r}, progress=False)
print("the run was not interrupted")
"""


@pytest.mark.slow
def test_crash_right_after_async_save_keeps_a_restorable_checkpoint(reference_run, tmp_path):
    """A training process killed (os._exit) right after `Checkpointer.save` of step 3N returned,
    i.e. with that asynchronous save in flight: the latest checkpoint is 2N, it and N restore
    completely and equal the straight run's; planted temporaries of later steps are ignored;
    training resumes to 4N (re-saving 3N over the stale temporary) and matches bitwise."""
    run = tmp_path / "run"
    steps, crash_step = 4 * N, 3 * N
    overrides = tiny_overrides(
        f"train.steps={steps}", f"checkpoint.every={N}", "checkpoint.keep=10", "checkpoint.async_save=true"
    )
    proc = run_python(
        CRASH_SCRIPT.format(crash_step=crash_step, overrides=overrides, run=str(run)), timeout=400
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    ckpt_dir = run / "checkpoints"
    entries = sorted(p.name for p in ckpt_dir.iterdir())
    # the process died with the save of crash_step half written (orbax's temporary directory)
    assert f"{crash_step}.orbax-checkpoint-tmp" in entries and str(crash_step) not in entries, entries

    cfg = tiny_config()
    latest = Checkpointer(ckpt_dir, cfg.checkpoint).latest_step()
    assert latest == 2 * N, (latest, entries)  # the interrupted save is not taken
    # the latest checkpoint, and every earlier one, restores completely and exactly
    for step in range(N, latest + 1, N):
        state, _ = restore_checkpoint(run, step, cfg)
        ref_state, _ = restore_checkpoint(reference_run, step, cfg)
        assert_trees_equal(state, ref_state, f"step {step} ")

    # an unfinished save of a later step, as orbax names its temporaries (<step>.orbax-checkpoint-tmp,
    # older versions: ...-<timestamp>), is not a checkpoint
    for name in (f"{5 * N}.orbax-checkpoint-tmp", f"{6 * N}.orbax-checkpoint-tmp-1700000000000000"):
        shutil.copytree(ckpt_dir / str(N), ckpt_dir / name)
    assert Checkpointer(ckpt_dir, cfg.checkpoint).latest_step() == latest

    # and training resumes from it to the end, matching the straight run
    history = train(load_config("model/toy", overrides), run, progress=False)
    assert [r["step"] for r in history] == list(range(latest + 1, steps + 1))
    _assert_metrics_match_reference(history, reference_run)
    state, _ = restore_checkpoint(run, steps, cfg)
    ref_state, _ = restore_checkpoint(reference_run, steps, cfg)
    assert_trees_equal(state, ref_state, "final ")


# ------------------------------------------------------------- non-finite steps
def _poison_batch_at(monkeypatch, bad_steps, vocab: int):
    """Makes the loop's batches number `bad_steps` (1-based) hold a token id outside the
    vocabulary (the embedding gather then yields NaN)."""
    bad_steps = {bad_steps} if isinstance(bad_steps, int) else set(bad_steps)
    calls = {"n": 0}
    original = loop.device_batch

    def poisoned(local, sharding):
        calls["n"] += 1
        if calls["n"] in bad_steps:
            local = {**local, "input_ids": np.array(local["input_ids"])}
            local["input_ids"][0, 0] = vocab + 5
        return original(local, sharding)

    monkeypatch.setattr(loop, "device_batch", poisoned)


def test_nonfinite_loss_stops_with_last_good_checkpoint(reference_run, tmp_path, monkeypatch):
    """on_nonfinite=stop: NonFiniteLossError names the bad step and the last good checkpoint,
    which is on disk and equals the straight run's state at that step."""
    run = tmp_path / "run"
    cfg = tiny_config("train.steps=12", f"checkpoint.every={N}", "train.on_nonfinite=stop")
    bad = 2 * N + 1
    _poison_batch_at(monkeypatch, bad, cfg.model.vocab_size)
    with pytest.raises(NonFiniteLossError, match=rf"step {bad}: .*last good checkpoint \(step {2 * N}\)"):
        train(cfg, run, progress=False)
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, bad + 1))  # the bad step has its record
    assert records[-1]["finite"] == 0 and all(r["finite"] == 1 for r in records[:-1])
    _assert_metrics_match_reference(records[:-1], reference_run)
    assert Checkpointer(run / "checkpoints", cfg.checkpoint).latest_step() == 2 * N
    state, _ = restore_checkpoint(run, 2 * N, cfg)
    ref_state, _ = restore_checkpoint(reference_run, 2 * N, cfg)
    assert_trees_equal(state, ref_state, "last good checkpoint ")


@pytest.fixture(scope="module")
def skip_run(reference_run, tmp_path_factory):
    """A run with train.on_nonfinite=skip whose batches 1 and 6 are poisoned; a checkpoint at
    every step.  (history, run_dir).  (Uses `reference_run` only to compile after it.)"""
    run = tmp_path_factory.mktemp("skip") / "run"
    cfg = tiny_config("train.steps=7", "checkpoint.every=1", "checkpoint.keep=10", "train.on_nonfinite=skip")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _poison_batch_at(monkeypatch, {1, 6}, cfg.model.vocab_size)
        history = train(cfg, run, progress=False)
    return history, run


def test_nonfinite_loss_skip_policy_skips_the_update_and_continues(skip_run):
    history, run = skip_run
    cfg = tiny_config()
    assert [r["step"] for r in history] == list(range(1, 8))
    assert [r["finite"] for r in history] == [0, 1, 1, 1, 1, 0, 1]
    assert np.isfinite(history[-1]["loss"])
    # the skipped step left params, biases and AdamW state as they were after step 5
    before, _ = restore_checkpoint(run, 5, cfg)
    after, _ = restore_checkpoint(run, 6, cfg)
    for key in ("params", "biases", "opt_state", "rng"):
        assert_trees_equal(getattr(after, key), getattr(before, key), f"{key} ")
    assert int(after.step) == 6  # the step counter numbers batches: it advances
    final, _ = restore_checkpoint(run, 7, cfg)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(final.params))
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(after.params))
    )


def test_skipped_step_does_not_desynchronise_the_logged_and_applied_lr(skip_run):
    """After a skipped step the step counter advances (it numbers batches, checkpoints and the
    logged lr), so the lr the optimizer applies must advance with it.  The tiny schedule warms up
    from lr(0) = 0 to lr(1) = 1.5e-3: step 1 is skipped, so step 2 logs lr = lr(1) > 0 and
    must move the parameters."""
    history, run = skip_run
    cfg = tiny_config()
    assert history[0]["finite"] == 0 and history[1]["finite"] == 1
    assert history[1]["lr"] == pytest.approx(1.5e-3)
    skipped, _ = restore_checkpoint(run, 1, cfg)
    after, _ = restore_checkpoint(run, 2, cfg)
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(skipped.params))
    )
    assert moved > 1e-4, (
        "step 2 logged lr=1.5e-3 but applied lr=0: the optimizer's schedule count "
        "was rolled back with the skipped step while the step counter advanced"
    )
