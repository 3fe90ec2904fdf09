"""Several decode steps per dispatch (infer.decode_steps_per_dispatch = k): the tokens, log-probs,
tempered log-probs and recorded routing equal the one-step loop's (k = 1) on a mixed batch of
greedy and seeded sampled requests whose max_new_tokens are no multiples of k; a stop token in
the middle of a block ends the completion there and writes no cache after it; min_tokens bans the stop ids across a block
boundary; a request cancelled between dispatches gets nothing more; every cache block returns to
the pool; and the config refuses bad values in one line."""

import dataclasses

import jax
import numpy as np
import pytest

from frontier_jax.infer import Engine, InferConfig, SamplingParams
from tests.infer import tiny

K = 4
SAMPLED = dict(temperature=0.9, top_k=20, top_p=0.9)
PARAMS = [
    SamplingParams(max_new_tokens=9),
    SamplingParams(max_new_tokens=7, seed=5, **SAMPLED),
    SamplingParams(max_new_tokens=13, seed=1, temperature=0.7, record_routing=True, tempered_logprobs=True),
    SamplingParams(max_new_tokens=6, logprobs=3),
    SamplingParams(max_new_tokens=40),  # ends at infer.max_len = 48
]
PROMPTS = tiny.prompts((3, 11, 7, 5, 14))


@pytest.fixture(scope="module")
def model():
    return tiny.model()


def engine(model, k: int) -> Engine:
    return Engine(
        model, tokenizer=tiny.TOKENIZER, infer=dataclasses.replace(tiny.INFER, decode_steps_per_dispatch=k)
    )


@pytest.fixture(scope="module")
def reference(model):
    """The one-step loop's completions of PROMPTS and its expert loads."""
    eng = engine(model, 1)
    return eng.generate(PROMPTS, PARAMS), eng.expert_load()


def test_k_steps_per_dispatch_equal_the_one_step_loop(model, reference):
    reference, load = reference
    eng = engine(model, K)
    free = eng.scheduler.alloc.free_blocks
    got = eng.generate(PROMPTS, PARAMS)
    for want, have in zip(reference, got):
        assert have.output_ids == want.output_ids
        assert have.finish_reason == want.finish_reason
        np.testing.assert_allclose(have.logprobs, want.logprobs, atol=1e-5)
        if want.top_logprobs is not None:
            assert [[i for i, _ in t] for t in have.top_logprobs] == [
                [i for i, _ in t] for t in want.top_logprobs
            ]
    assert reference[-1].finish_reason == "length" and len(reference[-1].output_ids) == 48 - 14
    recorded, want = got[2], reference[2]
    np.testing.assert_allclose(recorded.tempered_logprobs, want.tempered_logprobs, atol=1e-5)
    np.testing.assert_array_equal(recorded.routed_experts, want.routed_experts)
    assert recorded.routed_experts.shape[0] == len(recorded.prompt_ids) + len(recorded.output_ids) - 1
    assert eng.scheduler.alloc.free_blocks == free
    # the expert loads count the appended tokens' forwards only, as the one-step loop does
    np.testing.assert_array_equal(eng.expert_load().load, load.load)
    assert eng.expert_load().tokens == load.tokens


def test_a_stop_mid_block_and_min_tokens_across_a_block_boundary(model, reference):
    reference, _ = reference
    greedy = reference[4].output_ids
    j = next(j for j in range(5, len(greedy)) if j % K and greedy[j] not in greedy[:j])
    stop = SamplingParams(max_new_tokens=40, stop_token_ids=(greedy[j],))
    # the stop id first appears at token 1 (in the first block) and is banned up to token 5
    first = next(j for j in range(1, len(greedy)) if greedy[j] not in greedy[:j])
    banned = SamplingParams(max_new_tokens=40, stop_token_ids=(greedy[first],), min_tokens=first + K + 1)
    prompts, params = [PROMPTS[4]] * 2, [stop, banned]
    want = engine(model, 1).generate(prompts, params)
    eng = engine(model, K)
    free = eng.scheduler.alloc.free_blocks
    ids = [eng.submit(p, sp) for p, sp in zip(prompts, params)]
    blocks = []  # the stopped row's blocks (its whole budget, the shared prompt block included)
    while not eng.scheduler.idle:
        eng.step()
        blocks = list(eng.scheduler.alloc._owned.get(ids[0], blocks))
    got = [eng.result(i) for i in ids]
    # the row wrote the latents of its prompt and tokens 0 .. j-1, then nothing: its stop's step
    # turned the cache writes off for the rest of the block
    size, written = tiny.INFER.block_size, len(PROMPTS[4]) + j
    for leaf in jax.tree.leaves((eng.cache.dense, eng.cache.moe)):  # not the unused MTP stack
        slots = np.asarray(leaf[:, np.asarray(blocks)]).reshape(leaf.shape[0], len(blocks) * size, -1)
        assert np.abs(slots[:, written - 1]).max() > 0
        assert not np.abs(slots[:, written:]).any()
    assert got[0].output_ids == greedy[: j + 1] and got[0].finish_reason == "stop"
    assert got[1].output_ids == want[1].output_ids and got[1].finish_reason == want[1].finish_reason
    assert greedy[first] not in got[1].output_ids[: first + K + 1]
    assert got[1].output_ids[:first] == greedy[:first] and got[1].output_ids[first] != greedy[first]
    assert eng.scheduler.alloc.free_blocks == free


def test_a_request_cancelled_between_dispatches_gets_nothing_more(model, reference):
    reference, _ = reference
    eng = engine(model, K)
    free = eng.scheduler.alloc.free_blocks
    events = {0: [], 1: []}
    ids = [
        eng.submit(p, sp, on_token=events[i].append) for i, (p, sp) in enumerate(zip(PROMPTS[:2], PARAMS[:2]))
    ]
    request = next(r for r in eng._requests() if r.id == ids[0])
    while len(request.output_ids) < 2:
        eng.step()
    kept = len(request.output_ids)
    assert 2 <= kept < PARAMS[0].max_new_tokens  # the prefill's token, then a block of K
    assert eng.cancel(ids[0])
    while not eng.scheduler.idle:
        eng.step()
    cancelled, other = eng.result(ids[0]), eng.result(ids[1])
    assert cancelled.finish_reason == "cancelled" and cancelled.output_ids == reference[0].output_ids[:kept]
    assert len([e for e in events[0] if e.token is not None]) == kept
    assert other.output_ids == reference[1].output_ids
    assert eng.scheduler.alloc.free_blocks == free


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(decode_steps_per_dispatch=0), "infer.decode_steps_per_dispatch=0 must be an integer >= 1"),
        (dict(decode_steps_per_dispatch=2.0), "infer.decode_steps_per_dispatch=2.0 must be an integer >= 1"),
        (
            dict(decode_steps_per_dispatch=4, speculative="mtp"),
            "infer.decode_steps_per_dispatch=4 with infer.speculative=mtp",
        ),
    ],
)
def test_bad_decode_steps_per_dispatch_is_refused_in_one_line(changes, message):
    with pytest.raises(ValueError, match=message) as error:
        InferConfig(**changes).validate()
    assert "\n" not in str(error.value)
