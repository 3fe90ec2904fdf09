"""Training's expert-load ledger (`runtime/expert_ledger.py` in `train/loop.py`): metrics.jsonl
carries max/mean per MoE layer over the window, and each checkpoint its window's steps as
expert_load.npz (covered by the checksums).  Each saved step's loads are checked against the
max/mean the jitted train step computed from its own loads (`moe_load_max_over_mean`, fp32); a
run resumed from a checkpoint logs the straight run's window figures (the window refilled)."""

import json
import shutil

import numpy as np
import pytest

from frontier_jax.parallel.placement import imbalance
from frontier_jax.runtime.expert_ledger import read_expert_load, read_ledger_steps
from frontier_jax.runtime.integrity import MANIFEST, OK, verify_step
from frontier_jax.train.loop import WINDOW_IMBALANCE, train

from .common import REF_EVERY, REF_STEPS, read_metrics, tiny_config


def test_checkpoints_hold_the_window_and_metrics_its_max_over_mean(reference_run):
    cfg = tiny_config()
    records = {r["step"]: r for r in read_metrics(reference_run)}
    assert all(len(records[s][WINDOW_IMBALANCE]) == cfg.model.num_moe_layers for s in records)
    np.testing.assert_allclose(records[1][WINDOW_IMBALANCE], records[1]["moe_load_max_over_mean"], rtol=1e-6)
    directory = reference_run / "checkpoints"
    for step in range(REF_EVERY, REF_STEPS + 1, REF_EVERY):
        path = directory / str(step) / "expert_load.npz"
        steps = read_ledger_steps(path)
        assert len(steps.tokens) == min(step, cfg.experts.window_steps)  # every step so far
        for k, load in enumerate(steps.loads):
            np.testing.assert_allclose(
                imbalance(load)[0], records[k + 1]["moe_load_max_over_mean"], rtol=1e-6
            )  # the step's own loads
            np.testing.assert_array_equal(load.sum(1), cfg.model.num_experts_per_tok * steps.tokens[k])
        window = read_expert_load(path)
        np.testing.assert_array_equal(window.load, steps.loads.sum(0))
        assert window.tokens == steps.tokens.sum() > 0
        assert imbalance(window.load)[0].tolist() == pytest.approx(records[step][WINDOW_IMBALANCE], rel=1e-12)
        assert verify_step(directory, step).status == OK
        assert "expert_load.npz" in json.loads((directory / str(step) / MANIFEST).read_text())["files"]


def test_a_resumed_run_refills_the_window_from_its_checkpoint(reference_run, tmp_path):
    """Resuming from checkpoint REF_EVERY (copied from the straight run) to 2 steps past it: the
    window figures of those steps are bitwise the straight run's (same state, same data; they
    sum every step since step 1, so an empty window after the resume would differ)."""
    run = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / str(REF_EVERY), run / "checkpoints" / str(REF_EVERY))
    records = train(tiny_config(f"train.steps={REF_EVERY + 2}", "checkpoint.every=0"), run, progress=False)
    reference = {r["step"]: r for r in read_metrics(reference_run)}
    assert [r["step"] for r in records] == [REF_EVERY + 1, REF_EVERY + 2]
    for record in records:
        assert record["moe_load_max_over_mean"] == reference[record["step"]]["moe_load_max_over_mean"]
        assert record[WINDOW_IMBALANCE] == reference[record["step"]][WINDOW_IMBALANCE]
