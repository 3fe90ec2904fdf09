"""Reward functions: the weighted sum against a naive loop, error isolation (a raising or hanging
function gives None to its samples, counted; a sample with no score at all is None, not 0), the
rule-based functions (math with equivalent forms, wrong and unparsable answers and timeouts;
format; exact; code in the sandbox) and `frontier-jax rewards score`."""

import json
import logging
import time

import pytest

from frontier_jax.cli import EXIT_USAGE, main
from frontier_jax.posttrain.builtin_rewards import exact_reward, format_reward
from frontier_jax.posttrain.math_reward import MathReward
from frontier_jax.posttrain.rewards import RewardsConfig, RewardSet, register_reward


@register_reward("test_length")
def _length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


@register_reward("test_sometimes")
def _sometimes(prompts, completions, flag=None, **columns):
    return [None if f else 1.0 for f in flag]


@register_reward("test_raises")
def _raises(prompts, completions, **columns):
    raise RuntimeError("scorer crashed")


@register_reward("test_hangs")
def _hangs(prompts, completions, **columns):
    time.sleep(1.0)
    return [1.0] * len(completions)


def test_weighted_sum_skips_none_terms_and_masks_samples_without_any(caplog):
    config = RewardsConfig.from_dict(
        {
            "functions": [
                {"name": "test_length", "weight": 0.5},
                {"name": "test_sometimes", "weight": 2.0},
                "test_raises",
            ]
        }
    )
    completions, flags = ["ab", "abcd", "", "xyz"], [False, True, True, False]
    with caplog.at_level(logging.WARNING), RewardSet(config) as rewards:
        scores = rewards.score(["p"] * 4, completions, flag=flags)
    expected = []
    for c, f in zip(completions, flags):
        terms = [0.5 * len(c)] + ([] if f else [2.0 * 1.0])
        expected.append(sum(terms))
    assert scores.reward == pytest.approx(expected)
    assert scores.by_function["test_raises"] == [None] * 4
    assert scores.none_counts == {"test_length": 0, "test_sometimes": 2, "test_raises": 4}
    assert rewards.failures["test_raises"] == 4 and "scorer crashed" in caplog.text

    only_failing = RewardsConfig.parse_names("test_sometimes,test_raises")
    with RewardSet(only_failing) as rewards:
        assert rewards.score(["p"] * 2, ["a", "b"], flag=[True, False]).reward == [None, 1.0]


def test_a_function_past_its_timeout_gives_none():
    with RewardSet(RewardsConfig.parse_names("test_hangs,test_length", timeout_s=0.2)) as rewards:
        scores = rewards.score(["p"], ["abc"])
    assert scores.by_function["test_hangs"] == [None] and scores.reward == [3.0]
    assert rewards.failures["test_hangs"] == 1


def test_unknown_reward_name_and_bad_weight_are_errors():
    with pytest.raises(ValueError, match="unknown reward function 'nope'.*math"):
        RewardSet(RewardsConfig.parse_names("math,nope"))
    with pytest.raises(ValueError, match="weight 'x'"):
        RewardsConfig.parse_names("math:x")


def test_math_reward_equivalent_forms_wrong_unparsable_and_timeouts():
    cases = [
        ("42", "<answer>42</answer>", 1.0),
        ("1/2", "The answer is 0.5", 1.0),
        ("\\frac{1}{2}", "<answer>$\\frac{2}{4}$</answer>", 1.0),
        ("3", "so x = $\\sqrt{9}$", 1.0),
        ("42", "<answer>41</answer>", 0.0),
        ("42", "I do not know", 0.0),
        ("1", "<answer>$9^{9^{9^{9}}}$</answer>", None),  # the comparison runs past 1 s
    ]
    math = MathReward(timeout_s=1, workers=2)
    try:
        golds, completions, expected = zip(*cases)
        assert math(["q"] * len(cases), list(completions), answer=list(golds)) == list(expected)
        assert math(["q"] * 2, ["5", "5"], answer=[None, "no number here"]) == [
            None,
            None,
        ]  # no gold: not scored
    finally:
        math.close()


def test_format_and_exact():
    completions = [
        "<think>12+30</think> so <answer>42</answer>",
        "<answer>42</answer>",
        "42",
        "<answer>4</answer><answer>2</answer>",
        "<answer></answer>",
    ]
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert exact_reward(
        None, ["<answer> Paris. </answer>", "paris", "Lyon"], answer=["paris", "PARIS", "Paris"]
    ) == [1.0, 1.0, 0.0]


def test_code_reward_runs_the_fenced_code_with_the_records_tests():
    config = RewardsConfig.parse_names("code", unconfined_sandbox=True)
    completions = [
        "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
        "def add(a, b):\n    return a - b\n",
        "no tests for this one",
    ]
    with RewardSet(config) as rewards:
        scores = rewards.score(
            ["p"] * 3, completions, tests=["assert add(2, 3) == 5", "assert add(2, 3) == 5", None]
        )
    assert scores.by_function["code"] == [1.0, 0.0, None]


def test_rewards_score_cli(tmp_path, capsys):
    rows = [
        {"prompt": "2+2?", "completion": "<answer>4</answer>", "answer": "4"},
        {"prompt": "3*3?", "completion": "9", "answer": "9"},
        {"prompt": "1+1?", "completion": "<answer>3</answer>", "answer": None},
    ]
    src, out = tmp_path / "completions.jsonl", tmp_path / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(["rewards", "score", "--rewards", "exact,format:0.2", "--in", str(src), "--out", str(out)]) == 0
    )
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["exact"], r["format"], r["reward"]) for r in scored] == [
        (1.0, 1.0, 1.2),
        (1.0, 0.0, 1.0),
        (None, 1.0, 0.2),
    ]
    assert all(r["prompt"] == s["prompt"] and r["answer"] == s["answer"] for r, s in zip(rows, scored))
    assert "exact 1, format 0" in capsys.readouterr().out

    code = main(["rewards", "score", "--rewards", "math,bogus", "--in", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == EXIT_USAGE and len(err) == 1 and err[0].startswith("error: unknown reward function 'bogus'")
    )
    src.write_text('{"prompt": "x"}\n')
    assert main(["rewards", "score", "--rewards", "exact", "--in", str(src), "--out", str(out)]) == EXIT_USAGE
    assert "completions.jsonl:1: no string field 'completion'" in capsys.readouterr().err

    for pair in (["--rewards", "model"], ["--rewards", "exact", "--reward-model", "runs/rm"]):
        assert main(["rewards", "score", *pair, "--in", str(src), "--out", str(out)]) == EXIT_USAGE
        assert "--rewards model and --reward-model RUN go together" in capsys.readouterr().err
