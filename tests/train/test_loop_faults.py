"""Faults a user can cause in the training loop (frontier_jax/train/loop.py), in process on the
shared tiny configuration (its programs are compiled once, by the reference run): each ends
with one error naming the step / file / field and the CLI's exit code for it, and nothing is
lost or overwritten.  README "When things go wrong" lists the exit codes."""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil

import orbax.checkpoint as ocp
import pytest

from frontier_jax import cli
from frontier_jax.train import batches, loop
from frontier_jax.train.checkpoint import Checkpointer
from frontier_jax.train.loop import train

from .common import (
    REF_EVERY,
    REPO,
    computed_metrics,
    read_metrics,
    restore_checkpoint,
    tiny_config,
    tiny_overrides,
)
from .test_checkpoint_resume import _poison_batch_at

N = REF_EVERY


def _cli_train(run_dir, *overrides: str) -> int:
    return cli.main(
        ["train", "--config", "model/toy", "--run-dir", str(run_dir), *tiny_overrides(*overrides)]
    )


def _error_line(stderr: str) -> str:
    """The one `error:` line among the CLI's stderr (the progress bar writes there too, and so
    can a library's logger: orbax's asyncio tasks of an earlier failed restore in the same
    process log "ERROR asyncio: Task exception was never retrieved" when collected)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr[-3000:]
    return errors[0]


def _copy_checkpoints(reference_run, run_dir, steps) -> None:
    for step in steps:
        shutil.copytree(reference_run / "checkpoints" / str(step), run_dir / "checkpoints" / str(step))


def _reference_records(reference_run) -> dict:
    return {r["step"]: r for r in read_metrics(reference_run)}


# ------------------------------------------------------------------ 21.8 non-finite
def test_skip_policy_fails_past_max_skipped_steps_in_a_row(reference_run, tmp_path, monkeypatch, capsys):
    """Every step non-finite with on_nonfinite=skip used to end with exit 0, "done" and a saved
    checkpoint.  Past train.max_skipped_steps in a row: exit 3, nothing saved, each step logged."""
    cfg = tiny_config()
    _poison_batch_at(monkeypatch, range(1, 100), cfg.model.vocab_size)
    run = tmp_path / "run"
    code = _cli_train(
        run, "train.steps=10", "checkpoint.every=5", "train.on_nonfinite=skip", "train.max_skipped_steps=2"
    )
    out, err = capsys.readouterr()
    assert code == 3 and "done:" not in out
    err = _error_line(err)
    assert err.startswith("error: steps 1..3 were all non-finite"), err
    assert "no checkpoint was written" in err and "train.max_skipped_steps=2" in err
    assert [(r["step"], r["finite"]) for r in read_metrics(run)] == [(1, 0), (2, 0), (3, 0)]
    assert Checkpointer(run / "checkpoints", cfg.checkpoint).latest_step() is None


def test_stop_policy_never_cites_a_checkpoint_that_is_not_there(reference_run, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=3")
    _poison_batch_at(monkeypatch, 2, cfg.model.vocab_size)
    with pytest.raises(
        loop.NonFiniteLossError, match=r"^step 2: non-finite .*no checkpoint was written"
    ) as err:
        train(cfg, tmp_path / "run", progress=False)
    assert "checkpoint (step" not in str(err.value)


# ------------------------------------------------------------------ 21.1 data
def test_a_source_with_no_usable_record_stops_training_with_exit_4(reference_run, tmp_path, capsys):
    """A source of records without a `text` field used to spin at step 0 for ever."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n' * 3)
    config = tmp_path / "bad_source.yaml"
    config.write_text(
        f"include: [{REPO / 'configs' / 'model' / 'toy.yaml'}]\n"
        f"data:\n  max_skipped_in_a_row: 500\n  sources:\n"
        f"    - {{name: code, kind: embedded_code, weight: 0.9}}\n"
        f"    - {{name: broken, kind: jsonl, path: {bad}, weight: 0.1}}\n"
    )
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--run-dir", str(run), *tiny_overrides("train.steps=3")]
    assert cli.main(argv) == 4
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: data source 'broken' gave no document in its last 500 records"), err
    assert "missing_field=500" in err
    assert not (run / "metrics.jsonl").exists() or not read_metrics(run)


# ------------------------------------------------------------------ 21.9 vocabulary
def test_tokenizer_larger_than_the_vocabulary_is_rejected_before_training(tmp_path, no_compile, capsys):
    assert _cli_train(tmp_path / "run", "model.vocab_size=128") == 2
    err = capsys.readouterr().err
    assert err == (
        "error: data.tokenizer='byte' has 266 token ids but model.vocab_size=128: set "
        "model.vocab_size >= 266, or use a smaller tokenizer\n"
    )
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 21.2 failed saves
def test_a_save_failing_in_the_background_stops_the_run_with_exit_5(
    reference_run, tmp_path, monkeypatch, capsys
):
    """A full disk during the asynchronous save of step 2N: reported before the next save, the
    run stops with the directory named, and checkpoint N stays the latest."""
    original = ocp.handlers.JsonCheckpointHandler._save_fn

    async def disk_full_at_2n(self, item, directory):
        if re.fullmatch(rf"{2 * N}(\..*)?", os.path.basename(os.path.dirname(str(directory)))):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, item, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full_at_2n)
    run = tmp_path / "run"
    assert _cli_train(run, f"train.steps={4 * N}", f"checkpoint.every={N}") == 5
    err = _error_line(capsys.readouterr().err)
    checkpoints = (run / "checkpoints").resolve()
    assert err.startswith(f"error: saving checkpoint {2 * N} in {checkpoints} failed (")
    assert f"No space left on device); the latest checkpoint is still {N}." in err
    assert Checkpointer(checkpoints, tiny_config().checkpoint).latest_step() == N
    assert read_metrics(run)[-1]["step"] <= 3 * N  # stopped before the next save


# ------------------------------------------------------------------ 21.4 / 21.11 fallback, one record per step
def test_resume_falls_back_past_a_corrupt_latest_checkpoint_with_one_record_per_step(
    reference_run, tmp_path, caplog
):
    """Checkpoint 2N truncated: a warning names it, it is kept as 2N.corrupt-checksum, training
    resumes from N and replays N+1..2N exactly; metrics.jsonl, which held steps 1..2N from before
    the crash, ends with one record per step."""
    run = tmp_path / "run"
    _copy_checkpoints(reference_run, run, (N, 2 * N))
    for path in glob.glob(f"{run}/checkpoints/{2 * N}/state/**/d/*", recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    reference = _reference_records(reference_run)
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(reference[s]) + "\n" for s in range(1, 2 * N + 1)) + '{"step": 9, "lo'
    )  # and a line cut short by the crash
    history = train(tiny_config(f"train.steps={2 * N}", f"checkpoint.every={N}"), run, progress=False)
    assert [r["step"] for r in history] == list(range(N + 1, 2 * N + 1))
    assert all(computed_metrics(r) == computed_metrics(reference[r["step"]]) for r in history)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 2 * N + 1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        [str(N), str(2 * N), f"{2 * N}.corrupt-checksum"]
    )
    assert any(
        f"checkpoint {2 * N} does not restore" in r.getMessage()
        and f"resuming from step {N}" in r.getMessage()
        for r in caplog.records
    )


# ------------------------------------------------------------------ 21.6 / 21.7 mismatched resumes
MIXTURE_50_50 = """include: [{toy}]
data:
  sources:
    - {{name: code, kind: embedded_code, weight: 0.5}}
    - {{name: math, kind: embedded_math, weight: 0.5}}
"""


@pytest.mark.parametrize(
    "override, named",
    [
        ("data.mask_documents=true", "data.mask_documents: checkpoint False vs config True"),
        (
            "mixture 0.5/0.5",
            "data.sources.0.weight: checkpoint 0.7 vs config 0.5; data.sources.1.weight: "
            "checkpoint 0.3 vs config 0.5",
        ),
        ("train.seq_len=16", "train.seq_len: checkpoint 32 vs config 16"),
    ],
)
def test_resume_into_another_data_stream_is_refused_and_leaves_the_run_dir_alone(
    reference_run, tmp_path, capsys, override, named
):
    """A changed packing mode used to crash inside grain (KeyError: 'parent'), a changed mixture
    to apply the old position to the new sources silently."""
    run = tmp_path / "run"
    _copy_checkpoints(reference_run, run, (N,))
    (run / "config.yaml").write_text("the config of the run that wrote the checkpoint\n")
    config = "model/toy"
    if override.startswith("mixture"):
        config = tmp_path / "mixture.yaml"
        config.write_text(MIXTURE_50_50.format(toy=REPO / "configs" / "model" / "toy.yaml"))
        override = "train.seed=0"
    argv = [
        "train",
        "--config",
        str(config),
        "--run-dir",
        str(run),
        *tiny_overrides(f"train.steps={N + 1}", override),
    ]
    assert cli.main(argv) == 2
    err = _error_line(capsys.readouterr().err)
    assert (
        err.startswith(
            f"error: checkpoint directory {(run / 'checkpoints').resolve()} saved its data position "
            "in another data stream ("
        )
        and named in err
        and "--restart-data" in err
    )
    assert (run / "config.yaml").read_text() == "the config of the run that wrote the checkpoint\n"
    assert not (run / "metrics.jsonl").exists()


def test_rejected_model_does_not_overwrite_config_yaml(reference_run, tmp_path):
    run = tmp_path / "run"
    _copy_checkpoints(reference_run, run, (N,))
    (run / "config.yaml").write_text("original\n")
    with pytest.raises(ValueError, match=r"model\.hidden_size: checkpoint 32 vs config 48"):
        train(tiny_config("model.hidden_size=48"), run, progress=False)
    assert (run / "config.yaml").read_text() == "original\n"


def test_restart_data_keeps_the_state_and_reads_the_new_stream_from_its_start(
    reference_run, tmp_path, capsys
):
    """--restart-data with another packing mode: the state of step N is resumed (same lr and step
    count as the reference), the data counters start again from zero."""
    run = tmp_path / "run"
    _copy_checkpoints(reference_run, run, (N,))
    argv = [
        "train",
        "--config",
        "model/toy",
        "--run-dir",
        str(run),
        "--restart-data",
        *tiny_overrides(f"train.steps={N + 1}", "data.mask_documents=true"),
    ]
    assert cli.main(argv) == 0
    (record,) = read_metrics(run)
    assert record["step"] == N + 1 and record["lr"] == _reference_records(reference_run)[N + 1]["lr"]
    assert "--restart-data: the data stream starts again" in capsys.readouterr().err
    cfg = tiny_config("data.mask_documents=true")
    fresh = batches.data_iterator(cfg)
    next(fresh)  # the new stream's first batch was step N+1's
    _, saved_position = restore_checkpoint(run, N + 1, cfg)
    assert saved_position == fresh.get_state()


def test_train_steps_at_or_below_the_latest_checkpoint_says_that_nothing_is_trained(
    reference_run, tmp_path, capsys
):
    run = tmp_path / "run"
    _copy_checkpoints(reference_run, run, (2 * N,))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert _cli_train(run, f"train.steps={N}") == 0
    err = capsys.readouterr().err
    assert (
        f"WARNING frontier_jax.train.loop: nothing to train: the latest checkpoint in {run / 'checkpoints'} is "
        f"step {2 * N} and train.steps={N} is below it; raise train.steps above {2 * N} to train on"
    ) in err.splitlines()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written
    assert train(tiny_config(f"train.steps={2 * N}"), run, progress=False) == []
