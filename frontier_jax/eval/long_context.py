"""Long-context probes: perplexity by position and passkey retrieval, over a `Scorer`.

Perplexity by position: N windows of T + 1 tokens cut from held-out documents (each at a seeded
offset, as training rows start anywhere in a document), every pair scored:
    CE(t) = -(1/N) sum_n log p(x_{n,t+1} | x_{n,0..t}),   t = 0 .. T-1
    PPL over positions [a, b) = exp(mean_{a <= t < b} CE(t))
A model trained on rows of T0 < T tokens shows how it extrapolates past T0.

Passkey retrieval (Mohtashami & Jaggi 2023): <bos>, filler text with the sentence "The pass key
is K. Remember it. K is the pass key." at depth d (the fraction of the filler before it), then
"What is the pass key? The pass key is " and K, K a random 5-digit number, T + 1 tokens in all.
A trial succeeds when the model's greedy (argmax) prediction of every token of K is right given
the prompt and the tokens of K before it, which is exactly when greedy decoding writes K; the
share of K's tokens predicted right and their mean -log p grade the trials that fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from frontier_jax.data.template import BOS
from frontier_jax.data.tokenizer import Tokenizer
from frontier_jax.eval.scorer import Scorer
from frontier_jax.eval.windows import Window

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is "


def position_windows(tokenizer: Tokenizer, texts: list[str], length: int, *, seed: int = 0) -> list[Window]:
    """One window of `length` pairs from each text of at least `length` + 1 tokens, at an offset
    drawn uniformly (seeded) from its valid range; shorter texts are left out."""
    rng = np.random.default_rng(seed)
    windows = []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text), np.int32)
        if len(ids) <= length:
            continue
        start = int(rng.integers(0, len(ids) - length))
        piece = ids[start : start + length + 1]
        windows.append(Window(piece[:-1], piece[1:], np.ones(length, np.int32), len(windows)))
    if not windows:
        raise ValueError(f"no text holds {length + 1} tokens: give longer documents or a shorter length")
    return windows


def nll_by_position(scorer: Scorer, windows: list[Window]) -> np.ndarray:
    """CE(t) [T] (float64, nats): the mean over windows of -log p at each position."""
    logprobs = np.stack([logprob for logprob, _ in scorer.score(windows, desc="positions")])
    return -logprobs.astype(np.float64).mean(axis=0)


def perplexity_by_bins(nll: np.ndarray, edges: list[int]) -> list[float]:
    """exp(mean CE) over the positions [edges[i], edges[i + 1])."""
    return [float(np.exp(nll[a:b].mean())) for a, b in zip(edges[:-1], edges[1:])]


@dataclasses.dataclass(frozen=True)
class PasskeyTrial:
    window: Window
    answer: slice  # the pairs whose targets are the passkey's tokens
    key_position: int  # the token position where the key sentence starts
    passkey: str


def passkey_trials(
    tokenizer: Tokenizer, *, length: int, depth: float, trials: int, seed: int = 0
) -> list[PasskeyTrial]:
    """`trials` passkey sequences of `length` + 1 tokens with the key sentence at `depth` in [0, 1]
    of the filler (module docstring); the filler starts at a seeded offset in its cycle."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    rng = np.random.default_rng(seed)
    cycle = tokenizer.encode(FILLER)
    question = tokenizer.encode(QUESTION)
    out = []
    for _ in range(trials):
        passkey = str(int(rng.integers(10_000, 100_000)))
        key = tokenizer.encode(f"The pass key is {passkey}. Remember it. {passkey} is the pass key. ")
        answer = tokenizer.encode(passkey)
        filler_len = length + 1 - 1 - len(key) - len(question) - len(answer)
        if filler_len < 0:
            raise ValueError(
                f"length={length} is too short for a passkey prompt ({length + 1 - filler_len} tokens)"
            )
        offset = int(rng.integers(0, len(cycle)))
        filler = (cycle * (filler_len // len(cycle) + 2))[offset : offset + filler_len]
        before = round(depth * filler_len)
        ids = np.asarray(
            [tokenizer.special_id(BOS), *filler[:before], *key, *filler[before:], *question, *answer],
            np.int32,
        )
        first = len(ids) - 1 - len(answer)  # the pair whose target is the first token of the passkey
        window = Window(ids[:-1], ids[1:], np.ones(length, np.int32), len(out))
        out.append(PasskeyTrial(window, slice(first, first + len(answer)), 1 + before, passkey))
    return out


def passkey_scores(scorer: Scorer, trials: list[PasskeyTrial]) -> dict[str, float]:
    """Over the trials: `accuracy`, the share whose passkey greedy decoding writes (module
    docstring); `token_accuracy`, the share of the passkey's tokens predicted right (greedy,
    given the prompt and the passkey's tokens before them); `nll`, their mean -log p (nats; a
    model that only knows "five digits follow" scores ln 10 = 2.30 per digit)."""
    scored = scorer.score([t.window for t in trials], desc="passkey")
    right = [greedy[t.answer] for t, (_, greedy) in zip(trials, scored)]
    nll = np.concatenate([-logprob[t.answer].astype(np.float64) for t, (logprob, _) in zip(trials, scored)])
    return {
        "accuracy": float(np.mean([r.all() for r in right])),
        "token_accuracy": float(np.concatenate(right).mean()),
        "nll": float(nll.mean()),
    }
