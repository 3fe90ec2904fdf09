"""Asynchronous decoding (infer.async_decode) emits exactly the synchronous loop's tokens: greedy
and seeded sampling, stop tokens and stop strings of several tokens hit while the next step is
already in flight (its extra token dropped), max_new_tokens and the cache budget, more requests
than decode slots (admission and prefill chunks interleaved with decode steps), and every cache
block back in the pool.  Greedy tokens of both loops also equal a naive greedy loop over full
forwards without a cache."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.data.tokenizer import byte_tokenizer
from frontier_jax.infer import Engine, InferConfig, SamplingParams
from frontier_jax.model import Transformer
from tests.model import common

INFER = InferConfig(block_size=8, max_seqs=3, max_len=32, prefill_chunk=6)
LENGTHS = (3, 17, 9, 5, 12, 2, 20)  # 7 requests, 3 slots; 17, 12, 20: several prefill chunks
STOPPED = (0, 1, 3)  # requests given a stop token that their reference output hits mid-run
# requests given a stop string of this many tokens from the middle of their reference text
STOP_STRINGS = {2: 2, 5: 3, 6: 3}
TOKENIZER = byte_tokenizer()  # the model's ids 0..63 are the bytes 0..63: one token a character


@pytest.fixture(scope="module")
def model():
    cfg = common.tiny_config(vocab_size=64)
    return common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=3)


def base_params() -> list[SamplingParams]:
    """Greedy and seeded sampled requests with different max_new_tokens; the last (prompt 20,
    max_new_tokens 30) ends at infer.max_len=32."""
    sampled = dict(temperature=0.9, top_k=20, top_p=0.9)
    return [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=10, seed=5, **sampled),
        SamplingParams(max_new_tokens=7, seed=11, **sampled),
        SamplingParams(max_new_tokens=14),
        SamplingParams(max_new_tokens=1),
        SamplingParams(max_new_tokens=9, temperature=1.3, seed=2),
        SamplingParams(max_new_tokens=30),
    ]


FORWARD = common.jit(lambda model, ids: model(ids)[0])  # [T, V] logits of one row


def naive_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding without a cache: each token the argmax of the model's full forward over
    the whole sequence so far (right-padded to infer.max_len: causal, so padding is not read)."""
    ids = np.zeros((1, INFER.max_len), np.int32)
    ids[0, : len(prompt)] = prompt
    for length in range(len(prompt), len(prompt) + new_tokens):
        ids[0, length] = int(jnp.argmax(FORWARD(model, jnp.asarray(ids))[length - 1]))
    return ids[0, len(prompt) : len(prompt) + new_tokens].tolist()


def run(model, async_decode: bool, prompts, params):
    """(completions, engine, steps that ended with a decode step in flight)."""
    engine = Engine(model, tokenizer=TOKENIZER, infer=dataclasses.replace(INFER, async_decode=async_decode))
    ids = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    in_flight = 0
    while not engine.scheduler.idle:
        engine.step()
        in_flight += engine._in_flight is not None
    return [engine.result(i) for i in ids], engine, in_flight


def first_new_token(output: list[int]) -> int:
    """The index of the first token (past the first two) not seen before it in `output`."""
    return next(j for j in range(2, len(output)) if output[j] not in output[:j])


def stop_string_end(output: list[int], size: int) -> tuple[str, int, str]:
    """A stop string of `size` tokens ending 2 tokens before `output` does -> (the string, the
    tokens up to the one completing its first occurrence, the text before that occurrence)."""
    stop = TOKENIZER.decode(output[-size - 2 : -2])
    end = next(j for j in range(1, len(output)) if stop in TOKENIZER.decode(output[:j]))
    text = TOKENIZER.decode(output[:end])
    return stop, end, text[: text.index(stop)]


def test_async_decode_emits_the_synchronous_tokens(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in LENGTHS]
    reference, _, _ = run(model, False, prompts, base_params())
    assert [c.finish_reason for c in reference] == ["length"] * len(prompts)
    assert len(reference[-1].output_ids) == INFER.max_len - LENGTHS[-1]  # the cache budget
    for prompt, p, c in zip(prompts, base_params(), reference):
        if p.temperature == 0:
            assert c.output_ids == naive_greedy(model, prompt, len(c.output_ids)), prompt

    params, expected = base_params(), [c.output_ids for c in reference]
    for i in STOPPED:  # stop at a token first emitted mid-run: later tokens must not appear
        j = first_new_token(reference[i].output_ids)
        params[i] = dataclasses.replace(params[i], stop_token_ids=(reference[i].output_ids[j],))
        expected[i] = reference[i].output_ids[: j + 1]
    texts = {}
    for i, size in STOP_STRINGS.items():  # found only in the text of the last `size` tokens
        stop, end, texts[i] = stop_string_end(reference[i].output_ids, size)
        params[i] = dataclasses.replace(params[i], stop=(stop, "\x7f"))  # the second never occurs
        expected[i] = reference[i].output_ids[:end]

    runs = {mode: run(model, mode, prompts, params) for mode in (False, True)}
    for mode, (completions, engine, in_flight) in runs.items():
        assert [c.output_ids for c in completions] == expected, f"async_decode={mode}"
        assert {i: completions[i].text for i in STOP_STRINGS} == texts, f"async_decode={mode}"
        for i, c in enumerate(completions):
            assert c.finish_reason == ("stop" if i in STOPPED or i in STOP_STRINGS else "length")
            assert len(c.logprobs) == len(c.output_ids)
        assert engine.stats["generated_tokens"] == sum(map(len, expected))
        assert engine.scheduler.alloc.free_blocks == engine.layout.num_blocks - 1  # no block leaked
        assert engine._in_flight is None
        assert (in_flight > 0) == mode  # async steps end with the next step on the device
    for a, b in zip(runs[False][0], runs[True][0]):  # slots refill a step later: other batch mates
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-5, atol=1e-5)


def test_async_decode_must_be_a_bool():
    with pytest.raises(ValueError, match="infer.async_decode='yes' must be true or false"):
        InferConfig(async_decode="yes").validate()
