"""The expert-load ledger (`runtime/expert_ledger.py`): the moving window against a naive sum
over the last steps, the total, and the .npz / .json / .npy files."""

import json

import numpy as np
import pytest

from frontier_jax.runtime.expert_ledger import (
    ExpertLedger,
    ExpertsConfig,
    read_expert_load,
    read_ledger_steps,
    save_expert_load,
)


def test_window_is_the_sum_of_the_last_steps():
    rng = np.random.default_rng(0)
    steps = [(rng.integers(0, 50, (2, 6)), int(rng.integers(1, 9))) for _ in range(7)]
    ledger = ExpertLedger(2, 6, window_steps=3)
    for n, (load, tokens) in enumerate(steps, start=1):
        ledger.record(load, tokens)
        last = steps[max(0, n - 3) : n]
        window = ledger.window()
        np.testing.assert_array_equal(window.load, np.sum([s[0] for s in last], axis=0))
        assert window.tokens == sum(s[1] for s in last)
        total = ledger.total()
        np.testing.assert_array_equal(total.load, np.sum([s[0] for s in steps[:n]], axis=0))
        assert total.tokens == sum(s[1] for s in steps[:n])
    ledger.reset()
    assert ledger.window().tokens == ledger.total().tokens == 0 and not ledger.total().load.any()


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_files_round_trip(tmp_path, suffix):
    """The window reads back from .npz and .json; the .npz refills a ledger with its steps."""
    ledger = ExpertLedger(3, 4, window_steps=2)
    for k in range(3):
        ledger.record(np.arange(12).reshape(3, 4) * (k + 1), 2 + k)
    save_expert_load(tmp_path / f"stats{suffix}", ledger.steps())
    read = read_expert_load(tmp_path / f"stats{suffix}")
    np.testing.assert_array_equal(read.load, np.arange(12).reshape(3, 4) * (2 + 3))
    assert read.tokens == 3 + 4
    if suffix == ".npz":
        refilled = ExpertLedger(3, 4, window_steps=2)
        refilled.extend(read_ledger_steps(tmp_path / "stats.npz"))
        refilled.record(np.ones((3, 4), np.int64), 1)
        ledger.record(np.ones((3, 4), np.int64), 1)
        assert refilled.window().tokens == ledger.window().tokens == 4 + 1
        np.testing.assert_array_equal(refilled.window().load, ledger.window().load)
    np.save(tmp_path / "plain.npy", read.load)
    assert read_expert_load(tmp_path / "plain.npy").tokens is None


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("s.csv", "1,2", "expert stats files end in .npz or .json or .npy, not '.csv'"),
        ("missing.npz", None, "missing.npz: no such file"),
        ("s.json", json.dumps({"load": [[1, 2]]}), "s.json: not an expert stats file \\(KeyError"),
        (
            "s.json",
            json.dumps({"load": [1, 2], "tokens": 3}),
            "must be a numeric \\[layers, experts\\] array",
        ),
    ],
)
def test_bad_files_are_one_error_line(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_expert_load(tmp_path / name)
    assert "\n" not in str(err.value)


def test_bad_window_and_shape():
    with pytest.raises(ValueError, match="experts.window_steps=0 must be an integer >= 1"):
        ExpertsConfig(window_steps=0).validate()
    with pytest.raises(
        ValueError, match="expert load of shape \\(3, 4\\) recorded in a ledger of \\(2, 4\\)"
    ):
        ExpertLedger(2, 4, 5).record(np.zeros((3, 4)), 1)
