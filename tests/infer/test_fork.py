"""Forked samples (SamplingParams.n): the prompt is prefilled once and its full blocks are shared;
greedy and seeded samples equal separate submissions (sample j with seed + j), with fewer cache
blocks in use."""

import dataclasses

import numpy as np

from frontier_jax.infer import Engine, SamplingParams
from tests.infer import tiny

N = 3
PROMPT = 13  # 1 full block of 8 shared, the partly filled second one copied; 3 prefill chunks of 6


def blocks_in_use_after_admission(engine: Engine, prompts, params) -> tuple[list[int], int]:
    ids = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    engine.step()
    used = engine.scheduler.alloc.used_blocks
    while not engine.scheduler.idle:
        engine.step()
    return ids, used


def test_forked_samples_equal_separate_submissions_with_fewer_blocks():
    model = tiny.model()
    prompt = tiny.prompts([PROMPT], seed=2)[0]
    other = tiny.prompts([5], seed=3)[0]  # a plain request batched with the group
    for base in (
        SamplingParams(max_new_tokens=10),
        SamplingParams(max_new_tokens=10, temperature=1.0, seed=40),
    ):
        forked = Engine(model, infer=tiny.INFER)
        (first, plain), forked_used = blocks_in_use_after_admission(
            forked, [prompt, other], [dataclasses.replace(base, n=N), SamplingParams(max_new_tokens=6)]
        )
        assert plain == first + N
        separate = Engine(model, infer=tiny.INFER)
        seeds = [None] * N if base.seed is None else [base.seed + j for j in range(N)]
        ids, separate_used = blocks_in_use_after_admission(
            separate,
            [prompt] * N + [other],
            [dataclasses.replace(base, seed=s) for s in seeds] + [SamplingParams(max_new_tokens=6)],
        )
        own = -(-(PROMPT + base.max_new_tokens) // tiny.INFER.block_size)  # blocks per sample: 3
        shared = PROMPT // tiny.INFER.block_size  # 1
        plain_blocks = 2  # 5 + 6 tokens
        assert separate_used == N * own + plain_blocks
        assert forked_used == own + (N - 1) * (own - shared) + plain_blocks
        assert forked.stats["prompt_tokens"] == PROMPT + len(other)  # the prompt prefilled once
        for j in range(N + 1):
            got, expected = forked.result(first + j), separate.result(ids[j])
            assert got.output_ids == expected.output_ids, f"sample {j}, {base}"
            np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=1e-5, atol=1e-5)
        samples = {tuple(forked.result(first + j).output_ids) for j in range(N)}
        assert len(samples) == (1 if base.temperature == 0 else N)  # greedy: all equal
        assert forked.scheduler.alloc.free_blocks == forked.layout.num_blocks - 1


def test_prompt_blocks_are_shared_after_the_prefill_and_a_cancelled_leader_hands_it_on():
    model = tiny.model()
    prompt = tiny.prompts([PROMPT], seed=2)[0]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, n=N)
    engine = Engine(model, infer=tiny.INFER)
    first = engine.submit(prompt, params)
    engine.step()  # admitted; the leader prefills positions 0 .. 5
    engine.step()  # .. 11: into its full block (0 .. 7) and its partly filled one
    alloc = engine.scheduler.alloc
    full = alloc.blocks(first)[0]
    own = -(-(PROMPT + params.max_new_tokens) // tiny.INFER.block_size)
    assert alloc.refs(full) == 1  # written by its sole holder; the followers wait with their own blocks
    assert [len(alloc.blocks(first + j)) for j in range(N)] == [own] + [own - 1] * (N - 1)
    assert engine.cancel(first)  # mid-prefill: sample 1 takes over from position 8, with the full block
    assert alloc.blocks(first + 1)[0] == full and alloc.refs(full) == 1
    engine.step()  # sample 1 prefills 8 .. 12 and forks: sample 2 shares the full block
    assert alloc.blocks(first + 2)[0] == full and alloc.refs(full) == N - 1
    assert alloc.blocks(first + 1)[1] != alloc.blocks(first + 2)[1]  # the partly filled one: a copy each
    while not engine.scheduler.idle:
        engine.step()
    separate = Engine(model, infer=tiny.INFER).generate(
        [prompt] * (N - 1), [dataclasses.replace(params, n=1, seed=params.seed + j) for j in range(1, N)]
    )
    for j, expected in enumerate(separate, 1):
        assert engine.result(first + j).output_ids == expected.output_ids
    assert engine.result(first).finish_reason == "cancelled"
    assert engine.stats["prompt_tokens"] == PROMPT + 4  # positions 8 .. 11 prefilled again


def test_samples_that_cannot_run_together_are_errors():
    engine = Engine(tiny.model(), infer=tiny.INFER)
    first = engine.submit([1, 2, 3], SamplingParams(n=5))
    for j in range(5):
        error = engine.result(first + j).error
        assert error == f"request {first + j}: n=5 samples exceed infer.max_seqs=4 decode slots"
    speculative = Engine(tiny.model(), infer=dataclasses.replace(tiny.INFER, speculative="mtp"))
    first = speculative.submit([1, 2, 3], SamplingParams(n=2))
    assert "with infer.speculative=mtp" in speculative.result(first).error
