"""Rejection sampling's keep rules, preference pairs and statistics on hand-made samples, and the
writer's resume: an interrupted run (a record or pair cut short, a statistics line cut short)
continues into the files an uninterrupted run writes."""

import json

import pytest

from frontier_jax.posttrain.rejection import (
    KeepRules,
    PairRules,
    Sample,
    Writer,
    preference_pairs,
    prompt_stats,
    select,
    summary,
)

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


def test_preference_pairs_put_a_kept_sample_or_the_gold_answer_against_distinct_wrong_ones():
    rules = KeepRules(threshold=1.0, max_per_prompt=1)
    samples = [
        Sample("<answer>8</answer>", 0.0, 5, True),
        Sample("<answer>7</answer>", 1.0, 5, True),
        Sample(" <answer>8</answer>", 0.0, 6, True),  # the same wrong text, normalised: one pair
        Sample("<answer>9</answer>", None, 5, True),  # unscored: neither side
        Sample("<answer>1", 0.0, 4, False),  # cut at the length limit: not a rejected side
        Sample("so <answer>7</answer>", 1.0, 7, True),
        Sample("<answer>6</answer>", 0.0, 5, True),
    ]
    # chosen: the kept samples in turn (here 2 per prompt), rejected: distinct wrong ones in order
    assert preference_pairs("q", samples, rules, PairRules(per_prompt=3)) == [
        {"prompt": "q", "chosen": "<answer>7</answer>", "rejected": "<answer>8</answer>"},
        {"prompt": "q", "chosen": "so <answer>7</answer>", "rejected": "<answer>6</answer>"},
    ]
    assert len(preference_pairs("q", samples, rules, PairRules(per_prompt=1))) == 1
    wrong_only = [s for s in samples if s.reward != 1.0]
    assert preference_pairs("q", wrong_only, rules, PairRules()) == []  # no chosen side, no gold
    gold = PairRules(per_prompt=2, gold_response="<answer>{answer}</answer>")
    assert preference_pairs("q", wrong_only, rules, gold, gold.gold({"prompt": "q", "answer": "7"})) == [
        {"prompt": "q", "chosen": "<answer>7</answer>", "rejected": "<answer>8</answer>"},
        {"prompt": "q", "chosen": "<answer>7</answer>", "rejected": "<answer>6</answer>"},
    ]
    right_only = [s for s in samples if s.reward == 1.0]
    assert preference_pairs("q", right_only, rules, gold, "<answer>7</answer>") == []  # no rejected side
    with pytest.raises(ValueError, match="no column 'answer'"):
        gold.gold({"prompt": "q"})
    with pytest.raises(ValueError, match="--pairs-per-prompt=0"):
        PairRules(per_prompt=0).check()


def _samples(i):
    """Prompt i: samples 0..i correct (distinct texts), the rest wrong."""
    return [
        Sample(f"try {j}: {GOOD}" if j <= i else f"<answer>{j}</answer>", float(j <= i), 4 + j, True)
        for j in range(3)
    ]


def _pairs(i, rules):
    return preference_pairs(f"p{i}", _samples(i), rules, PairRules(per_prompt=2), GOOD)


def test_writer_resumes_without_partial_or_repeated_records(tmp_path):
    rules = KeepRules(max_per_prompt=2, weight="per_prompt")
    settings = {"n": 3, "seed": 0}
    whole = Writer(tmp_path / "whole.jsonl", settings, tmp_path / "whole_pairs.jsonl")
    for i in range(3):
        whole.write(f"p{i}", _samples(i), rules, _pairs(i, rules))

    out, pairs = tmp_path / "cut.jsonl", tmp_path / "cut_pairs.jsonl"
    first = Writer(out, settings, pairs)
    for i in range(2):
        first.write(f"p{i}", _samples(i), rules, _pairs(i, rules))
    with open(out, "a") as f:  # prompt 2's records and pairs landed, cut short; its statistics never did
        f.write('{"prompt": "p2", "resp')
    with open(pairs, "a") as f:
        f.write('{"prompt": "p2", "cho')
    with open(first.stats_path, "a") as f:
        f.write('{"index": 2, "n"')
    resumed = Writer(out, settings, pairs)
    assert resumed.done == 2
    resumed.write("p2", _samples(2), rules, _pairs(2, rules))
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()
    assert pairs.read_text() == (tmp_path / "whole_pairs.jsonl").read_text()
    # p0: 1 kept vs 2 wrong -> 2 pairs; p1: 2 kept vs 1 wrong -> 1; p2: nothing wrong -> 0
    assert [json.loads(line)["prompt"] for line in pairs.read_text().splitlines()] == ["p0", "p0", "p1"]
    assert [s["pairs"] for s in resumed.stats] == [2, 1, 0] and summary(resumed.stats)["pairs"] == 3
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
