"""Sampler features for serving: prompt log-probs (`prompt_logprobs`), the top-k alternatives of
each generated token (`logprobs`) and `min_tokens` (stop ids banned until then).

Reference: the model's plain forward over the whole sequence (no cache, no chunks) in fp32, its
log-softmax at temperature 1, and a naive greedy loop over it that bans the stop ids while fewer
than min_tokens tokens are out.  Tolerance 1e-4 on log-probs (the engine's chunked prefill and
absorbed decode round differently from one full forward)."""

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.infer import Engine, SamplingParams
from tests.infer import tiny

TOL = 1e-4


def reference_logprobs(model, ids: list[int], length: int = 0) -> np.ndarray:
    """log softmax of the model's logits at every position of `ids` [T, V] (one causal forward;
    padded with zeros to `length`, which leaves the positions of `ids` unchanged, so that one
    program serves a growing sequence)."""
    padded = list(ids) + [0] * max(length - len(ids), 0)
    logits = model.forward(jnp.asarray([padded]), with_mtp=False).logits[0, : len(ids)]
    return np.array(jax.nn.log_softmax(logits.astype(jnp.float32), -1))


def test_prompt_logprobs_and_alternatives_equal_one_full_forward():
    model = tiny.model()
    prompt = tiny.prompts([17])[0]  # prefill chunks of 6: three chunks, the scores cross them
    engine = Engine(model, tokenizer=tiny.TOKENIZER, infer=tiny.INFER)
    params = SamplingParams(max_new_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    completion = engine.generate([prompt], params)[0]
    reference = reference_logprobs(model, prompt + completion.output_ids)

    scores = completion.prompt_logprobs
    assert len(scores) == len(prompt) and scores[0] is None
    for i in range(1, len(prompt)):
        chosen, top = scores[i]
        np.testing.assert_allclose(chosen, reference[i - 1, prompt[i]], atol=TOL)
        expected = np.argsort(-reference[i - 1])[:2]
        assert [t for t, _ in top] == expected.tolist()
        np.testing.assert_allclose([v for _, v in top], reference[i - 1, expected], atol=TOL)
    for n, (token, top) in enumerate(zip(completion.output_ids, completion.top_logprobs)):
        row = reference[len(prompt) - 1 + n]
        assert len(top) == 3 and top[0][0] == token == int(np.argmax(row))  # greedy: the first
        np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:3], atol=TOL)
        np.testing.assert_allclose(completion.logprobs[n], row[token], atol=TOL)


def test_min_tokens_bans_stop_ids_until_reached_in_prefill_and_decode_steps():
    model = tiny.model()
    prompt = tiny.prompts([9], seed=2)[0]
    engine = Engine(model, tokenizer=tiny.TOKENIZER, infer=tiny.INFER)
    free = engine.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].output_ids
    stop = tuple(sorted(set(free[:3])))  # the greedy tokens of the first sample and two decode steps
    ended = engine.generate([prompt], SamplingParams(max_new_tokens=6, stop_token_ids=stop, ignore_eos=True))
    assert ended[0].output_ids == free[:1] and ended[0].finish_reason == "stop"

    params = SamplingParams(max_new_tokens=6, stop_token_ids=stop, ignore_eos=True, min_tokens=4)
    got = engine.generate([prompt], params)[0]
    ids = list(prompt)  # naive loop: argmax over the full forward, stop ids banned while < 4 out
    for n in range(6):
        row = reference_logprobs(model, ids, len(prompt) + 6)[-1]
        if n < 4:
            row[list(stop)] = -np.inf
        ids.append(int(np.argmax(row)))
        if ids[-1] in stop:
            break
    assert got.output_ids == ids[len(prompt) :]
    assert not set(got.output_ids[:4]) & set(stop)
