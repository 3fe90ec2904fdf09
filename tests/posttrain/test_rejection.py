"""Rejection sampling's keep rules and statistics on hand-made samples, and the writer's resume:
an interrupted run (a record cut short, a statistics line cut short) continues into the file an
uninterrupted run writes."""

import json

import pytest

from frontier_jax.posttrain.rejection import KeepRules, Sample, Writer, prompt_stats, select, summary

GOOD = "<answer>7</answer>"


def test_keep_rules_threshold_none_format_length_truncation_dedup_and_k():
    samples = [
        Sample("<answer>7</answer>", 1.0, 5, True),
        Sample(" <answer>7</answer>", 1.0, 6, True),  # the same text, normalised: dropped
        Sample("7", 1.2, 1, True),  # best reward but no format
        Sample("<answer>8</answer>", 0.5, 5, True),  # below the threshold
        Sample("<answer>9</answer>", None, 5, True),  # unscored: never kept
        Sample("<think>3+4</think><answer>7</answer>", 1.1, 12, True),  # too long for max_tokens=10
        Sample("<answer>07</answer>", 1.0, 6, False),  # cut at the length limit
        Sample("so <answer>7.0</answer>", 1.0, 8, True),
    ]
    rules = KeepRules(threshold=1.0, require_format=True, max_tokens=10, max_per_prompt=3)
    assert [s.text for s in select(samples, rules)] == ["<answer>7</answer>", "so <answer>7.0</answer>"]
    assert [s.text for s in select(samples, KeepRules(threshold=1.0, max_per_prompt=2))] == [
        "7",
        "<think>3+4</think><answer>7</answer>",
    ]
    truncated = KeepRules(
        threshold=1.0, require_format=True, max_tokens=10, max_per_prompt=8, keep_truncated=True
    )
    assert "<answer>07</answer>" in [s.text for s in select(samples, truncated)]
    stats = prompt_stats(0, samples, select(samples, rules), rules)
    assert (stats["n"], stats["correct"], stats["pass_at_n"], stats["unscored"], stats["kept"]) == (
        8,
        6,
        1.0,
        1,
        2,
    )
    with pytest.raises(ValueError, match="--max-per-prompt=0"):
        KeepRules(max_per_prompt=0).check()


def _samples(i):
    """Prompt i: samples 0..i correct (distinct texts), the rest wrong."""
    return [
        Sample(f"try {j}: {GOOD}" if j <= i else f"<answer>{j}</answer>", float(j <= i), 4 + j, True)
        for j in range(3)
    ]


def test_writer_resumes_without_partial_or_repeated_records(tmp_path):
    rules = KeepRules(max_per_prompt=2, weight="per_prompt")
    settings = {"n": 3, "seed": 0}
    whole = Writer(tmp_path / "whole.jsonl", settings)
    for i in range(3):
        whole.write(f"p{i}", _samples(i), rules)

    out = tmp_path / "cut.jsonl"
    first = Writer(out, settings)
    for i in range(2):
        first.write(f"p{i}", _samples(i), rules)
    with open(out, "a") as f:  # prompt 2's records landed, cut short; its statistics never did
        f.write('{"prompt": "p2", "resp')
    with open(first.stats_path, "a") as f:
        f.write('{"index": 2, "n"')
    resumed = Writer(out, settings)
    assert resumed.done == 2
    resumed.write("p2", _samples(2), rules)
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["weight"]) for r in records] == [
        ("p0", 1.0),
        ("p1", 0.5),
        ("p1", 0.5),
        ("p2", 0.5),
        ("p2", 0.5),
    ]
    assert set(records[0]) == {"prompt", "response", "weight"}
    assert summary(resumed.stats)["pass_at_n"] == 1.0 and summary(resumed.stats)["kept"] == 5

    with pytest.raises(ValueError, match="other settings"):
        Writer(out, {"n": 4, "seed": 0})
