"""Training's expert-load ledger (`runtime/expert_ledger.py` in `train/loop.py`): metrics.jsonl
carries max/mean per MoE layer over the window, and each checkpoint its window's steps as
expert_load.npz (covered by the checksums).  Each saved step's loads are checked against the
max/mean the jitted train step computed from its own loads (`moe_load_max_over_mean`, fp32);
that a resumed run restores the window is checked by test_checkpoint_resume.py (same metrics
records as the straight run)."""

import json

import numpy as np
import pytest

from frontier_jax.parallel.placement import imbalance
from frontier_jax.runtime.expert_ledger import read_expert_load, read_ledger_steps
from frontier_jax.runtime.integrity import MANIFEST, OK, verify_step
from frontier_jax.train.loop import WINDOW_IMBALANCE

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
