"""The long-context probes (frontier_jax/eval/long_context.py): how the passkey and position
windows are built, and what is computed from a scorer's log-probabilities and greedy flags."""

from __future__ import annotations

import math

import numpy as np
import pytest

from frontier_jax.data import byte_tokenizer
from frontier_jax.eval.long_context import (
    QUESTION,
    nll_by_position,
    passkey_scores,
    passkey_trials,
    perplexity_by_bins,
    position_windows,
)

TOKENIZER = byte_tokenizer()


def _text(ids) -> str:
    return TOKENIZER.decode([int(i) for i in ids])


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_sequences(depth):
    trials = passkey_trials(TOKENIZER, length=256, depth=depth, trials=5, seed=3)
    assert len({t.passkey for t in trials}) > 1
    for trial in trials:
        w = trial.window
        assert len(w.input_ids) == len(w.targets) == 256
        np.testing.assert_array_equal(w.input_ids[1:], w.targets[:-1])  # one sequence, shifted
        assert w.input_ids[0] == TOKENIZER.special_id("bos")
        assert _text(w.targets[trial.answer]) == trial.passkey and trial.answer.stop == 256  # K ends it
        assert _text(w.input_ids[: trial.answer.start + 1]).endswith(QUESTION)
        text = _text(w.input_ids[trial.key_position :])
        assert text.startswith(
            f"The pass key is {trial.passkey}. Remember it. {trial.passkey} is the pass key."
        )
        # the key sentence sits at `depth` of the filler between <bos> and the question
        key_len = len(f"The pass key is {trial.passkey}. Remember it. {trial.passkey} is the pass key. ")
        filler = 256 + 1 - 1 - key_len - len(QUESTION) - len(trial.passkey)
        assert trial.key_position - 1 == round(depth * filler)


def test_a_context_too_short_for_the_prompt_is_refused():
    with pytest.raises(ValueError, match="length=64 is too short for a passkey prompt"):
        passkey_trials(TOKENIZER, length=64, depth=0.5, trials=1)


def test_position_windows_are_cut_from_long_enough_texts():
    texts = ["a" * 10, "".join(chr(97 + i % 26) for i in range(300)), "b" * 33]
    windows = position_windows(TOKENIZER, texts, 32, seed=0)
    assert [w.sequence for w in windows] == [0, 1]  # the 10-byte text is too short
    long = windows[0]
    whole = TOKENIZER.encode(texts[1])
    start = whole.index(int(long.input_ids[0]))  # the alphabet cycle: the first letter fixes the offset
    assert (
        list(long.input_ids) == whole[start : start + 32]
        and list(long.targets) == whole[start + 1 : start + 33]
    )
    with pytest.raises(ValueError, match="no text holds 33 tokens"):
        position_windows(TOKENIZER, ["short"], 32)


class _Scores:
    """A scorer returning given (logprob, greedy) arrays per window, for the aggregation."""

    def __init__(self, outputs):
        self.outputs = outputs

    def score(self, windows, desc=""):
        assert len(windows) == len(self.outputs)
        return self.outputs


def test_nll_by_position_and_bins():
    logprobs = [np.log(np.array([0.5, 0.25, 0.5, 0.125], np.float32)), np.log(np.full(4, 0.5, np.float32))]
    nll = nll_by_position(_Scores([(lp, None) for lp in logprobs]), [None, None])
    np.testing.assert_allclose(nll, [math.log(2), 1.5 * math.log(2), math.log(2), 2 * math.log(2)], rtol=1e-6)
    assert perplexity_by_bins(nll, [0, 2, 4]) == pytest.approx([2**1.25, 2**1.5])


def test_passkey_scores():
    """accuracy needs every token of the key; token accuracy and NLL count the key's tokens only."""
    trials = passkey_trials(TOKENIZER, length=200, depth=0.5, trials=3, seed=0)
    greedy = [np.zeros(200, bool) for _ in trials]
    logprob = [np.full(200, -9.0, np.float32) for _ in trials]
    greedy[0][trials[0].answer] = True  # all of K right
    greedy[1][trials[1].answer] = True
    greedy[1][trials[1].answer.stop - 1] = False  # its last digit wrong
    greedy[2][: trials[2].answer.start] = True  # everything right but K
    for lp, trial, value in zip(logprob, trials, (0.0, -1.0, -2.0)):
        lp[trial.answer] = value
    scores = passkey_scores(_Scores(list(zip(logprob, greedy))), trials)
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["token_accuracy"] == pytest.approx(9 / 15)  # 5-digit keys: 5 + 4 + 0 of 15
    assert scores["nll"] == pytest.approx(1.0)
