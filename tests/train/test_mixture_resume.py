"""Resume across a change of mixture weights in the training loop: a run resumed from a
checkpoint written before the change trains on exactly the batches of the uninterrupted run
(every logged metric equal, the per-source token counts included), and the counts follow the
schedule."""

from __future__ import annotations

import shutil

import pytest

from frontier_jax.train.loop import train

from .common import computed_metrics, tiny_config

# the toy's sources code (0.7) and math (0.3); math alone from step 3 (the 4th step) on
STAGES = "data.stages=[{start_step: 3, weights: {math: 1}}]"
STEPS = 6


@pytest.mark.slow  # two train() runs; the data-level resume across a change runs by default (tests/data/test_mixture.py)
def test_resume_before_a_weight_change_trains_on_the_uninterrupted_batches(tmp_path):
    cfg = tiny_config(STAGES, "data.shuffle_window=64", f"train.steps={STEPS}", "checkpoint.every=2")
    straight = train(cfg, tmp_path / "straight", progress=False)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
    resumed = train(cfg, tmp_path / "resumed", progress=False)
    assert [r["step"] for r in resumed] == list(range(3, STEPS + 1))
    for got, want in zip(resumed, straight[2:]):
        assert computed_metrics(got) == computed_metrics(want), f"step {want['step']}"

    row = 32  # seq_len of the tiny run: full rows of real tokens, 8 a batch
    code = [r["data/code/tokens"] for r in straight]
    math = [r["data/math/tokens"] for r in straight]
    assert [c + m for c, m in zip(code, math)] == [8 * row * (k + 1) for k in range(STEPS)]
    assert code[0] in (5 * row, 6 * row) and code[2:] == [code[2]] * (STEPS - 2)  # no code from step 4 on
    assert straight[-1]["data/math/target_share"] == (3 * 8 * 0.3 + 3 * 8) / (STEPS * 8)
