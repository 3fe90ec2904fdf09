"""The ablation runner on a 2-arm x 2-seed micro config: every run trained and evaluated, the
summary equal to numpy's mean / sample std / difference of the runs' own figures, the table and
the curves written, a second invocation re-running nothing, and a bad file named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from frontier_jax.config import load_config
from frontier_jax.eval import ablate

from .common import TINY_MODEL

MICRO = f"""
base: model/toy
overrides: [{", ".join(TINY_MODEL)}, train.seq_len=16, train.global_batch=8, train.steps=3,
            train.warmup_steps=1, checkpoint.every=0, eval.max_documents=6, eval.seq_len=16, eval.batch_size=8,
            "eval.data=[{{name: math_held_out, kind: embedded_math}},
                        {{name: code_held_out, kind: embedded_code, max_documents: 2, max_chars: 200}}]"]
seeds: [0, 1]
arms:
  mtp_on: [model.mtp_depth=1]
  mtp_off: [model.mtp_depth=0]
metrics: [ce_loss]
"""


@pytest.mark.slow
def test_ablation_runs_every_arm_and_seed_summarises_and_resumes(tmp_path, monkeypatch):
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO)
    out = tmp_path / "out"
    result = ablate.run_ablation(path, out, load_config=load_config, progress=False)
    runs = result["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == [
        ("mtp_off", 0),
        ("mtp_off", 1),
        ("mtp_on", 0),
        ("mtp_on", 1),
    ]
    assert all(r["step"] == 3 for r in runs)
    assert all(set(r["held_out"]) == {"math_held_out", "code_held_out"} for r in runs)
    key = "held_out/math_held_out/bits_per_byte"
    values = {
        arm: np.asarray([r["held_out"]["math_held_out"]["bits_per_byte"] for r in runs if r["arm"] == arm])
        for arm in ("mtp_on", "mtp_off")
    }
    assert values["mtp_on"][0] != values["mtp_on"][1]  # the seeds change the initialisation
    stats = result["summary"][key]
    for arm, v in values.items():
        np.testing.assert_allclose(
            [stats[arm]["mean"], stats[arm]["std"]], [v.mean(), v.std(ddof=1)], rtol=1e-12
        )
    diff = values["mtp_off"].mean() - values["mtp_on"].mean()
    noise = 2 * np.sqrt(values["mtp_off"].var(ddof=1) / 2 + values["mtp_on"].var(ddof=1) / 2)
    np.testing.assert_allclose(
        [stats["mtp_off"]["diff"], stats["mtp_off"]["noise"]], [diff, noise], rtol=1e-12
    )
    assert stats["mtp_off"]["exceeds_noise"] == bool(abs(diff) > noise)
    assert "mtp_off − mtp_on" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"][key]["mtp_on"]["n"] == 2

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablate, "train", no_training)
    again = ablate.run_ablation(path, out, load_config=load_config, progress=False)
    assert again["summary"] == result["summary"]


@pytest.mark.parametrize(
    "body,message",
    [
        ("base: model/toy\nseeds: [0]\narms: {a: [train.steps=1]}\n", "at least two arm names"),
        ("base: model/toy\nseeds: [0, 0]\narms: {a: [], b: []}\n", "distinct integers"),
        ("base: model/toy\nseeds: [0]\narms: {a: [], b: [train.nope=1]}\n", "train.nope"),
        ("base: model/toy\nseed: [0]\narms: {a: [], b: []}\n", "unknown keys"),
        ("base: [model/toy\nseeds: [0]\n", "YAML syntax error at line 2, column 6: expected ',' or ']'"),
    ],
)
def test_bad_ablation_file_names_the_problem(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        ablate.load_ablation(path, load_config)
