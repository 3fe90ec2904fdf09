"""Prefix caching: a prompt reuses the cached full blocks of an earlier sequence with the same
leading tokens and prefills only the rest.  Outputs (greedy and seeded, fp32) equal an engine
without the cache; hits equal the full shared blocks counted here from the block size; freed
blocks are evicted least recently used first; new weights flush the cache; MTP drafts equal
the uncached engine's."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from frontier_jax.infer import Engine, PrefixCacheStats, SamplingParams
from frontier_jax.infer.cache import BlockAllocator, CacheLayout, chain_keys
from frontier_jax.model import Transformer
from tests.infer import tiny
from tests.infer.test_load_weights import weights
from tests.infer.test_speculative import SPECULATIVE, record_drafts
from tests.model import common

P = tiny.INFER.block_size
OFF = dataclasses.replace(tiny.INFER, prefix_cache=False)
GREEDY = SamplingParams(max_new_tokens=6)
SEEDED = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)


@pytest.fixture(scope="module")
def model():
    return tiny.model()


def shared_prefix_prompts(prefix: int, suffixes: list[int], seed: int) -> list[list[int]]:
    """Prompts of one random `prefix`-token prefix followed by random suffixes of these lengths."""
    base = tiny.prompts([prefix], seed)[0]
    return [base + suffix for suffix in tiny.prompts(suffixes, seed + 1)]


def expected_cached(prompt: list[int], earlier: list[list[int]]) -> int:
    """Tokens of `prompt` a cache holding every full block of the `earlier` sequences (their
    tokens whose latents were computed) serves: the most leading full blocks equal to one of
    them, the last prompt token always computed again."""
    best = 0
    for seq in earlier:
        k = 0
        while (k + 1) * P <= min(len(prompt) - 1, len(seq)) and prompt[k * P : (k + 1) * P] == seq[
            k * P : (k + 1) * P
        ]:
            k += 1
        best = max(best, k)
    return best * P


def assert_same(got, expected, what) -> None:
    assert got.output_ids == expected.output_ids, what
    np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=1e-5, atol=1e-5, err_msg=str(what))


def run_all(engine: Engine) -> None:
    while not engine.scheduler.idle:
        engine.step()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prompts_in_sequence_reuse_the_shared_full_blocks_with_outputs_unchanged(model, params):
    # 24, 29, 21 and 20 tokens after a prefix of 20: 2 full blocks shared; then the first 28 of
    # the 29: 3 blocks
    prompts = shared_prefix_prompts(20, [4, 9, 1, 0], seed=5)
    prompts.append(prompts[1][:28])
    cached, uncached = Engine(model, infer=tiny.INFER), Engine(model, infer=OFF)
    earlier, hits = [], []
    for k, prompt in enumerate(prompts):
        (got,) = cached.generate([prompt], params)
        (expected,) = uncached.generate([prompt], params)
        assert_same(got, expected, k)
        assert got.cached_tokens == expected_cached(prompt, earlier) and expected.cached_tokens == 0
        hits.append(got.cached_tokens)
        earlier.append(prompt + got.output_ids[:-1])  # the last token's latent is never computed
    assert hits[1:] == [2 * P, 2 * P, 2 * P, 3 * P]  # the reference above, spelled out
    assert cached.prefix_cache_stats() == PrefixCacheStats(sum(map(len, prompts)), sum(hits))
    assert uncached.prefix_cache_stats() == PrefixCacheStats(0, 0)
    assert cached.stats["prompt_tokens"] == sum(map(len, prompts)) - sum(hits)  # only the rest prefilled


def test_a_whole_cached_prompt_still_computes_its_last_token(model):
    for prompt in tiny.prompts([3 * P, 2 * P + 1], seed=9):
        engine = Engine(model, infer=tiny.INFER)
        (first,) = engine.generate([prompt], SEEDED)
        (again,) = engine.generate([prompt], SEEDED)  # every full block cached
        assert again.cached_tokens == 2 * P  # 3P tokens: the last block is computed again
        assert_same(again, first, len(prompt))
        assert engine.stats["prompt_tokens"] == 2 * len(prompt) - again.cached_tokens


def test_concurrent_requests_and_forked_samples_share_the_cached_prefix(model):
    """The first request's prompt blocks, keyed after its prefill, are shared while it decodes
    by requests submitted then (n = 2 samples among them)."""
    first, *others = shared_prefix_prompts(17, [2, 5, 7], seed=7)  # 19, 22, 24 tokens
    params = [dataclasses.replace(SEEDED, n=2, seed=20), GREEDY]

    def run(infer):
        engine = Engine(model, infer=infer)
        ids = [engine.submit(first, GREEDY)]
        for _ in range(-(-len(first) // tiny.INFER.prefill_chunk)):
            engine.step()  # its prefill, chunk by chunk
        ids += [i for p, sp in zip(others, params) for i in range(engine.submit(p, sp), engine._next_id)]
        engine.step()  # admitted with 2 blocks cached; 22 - 16 and 24 - 16 tokens prefilled, forked
        alloc = engine.scheduler.alloc
        refs = [alloc.refs(b) for b in alloc.blocks(ids[0])[:2]]
        run_all(engine)
        return [engine.result(i) for i in ids], refs

    (got, refs), (expected, no_refs) = run(tiny.INFER), run(OFF)
    assert refs == [4, 4] and no_refs == [1, 1]  # the first request and the 3 samples after it
    for k, (a, b) in enumerate(zip(got, expected)):
        assert_same(a, b, k)
    assert [c.cached_tokens for c in got] == [0, 2 * P, 2 * P, 2 * P]


def test_freed_blocks_are_evicted_least_recently_used_first(model):
    """6 free blocks (the rest of the pool held by another sequence), prompts of 2P + 1 tokens
    (3 blocks each, 2 of them full and kept): after a, b, then a again (a's blocks now the most
    recent), c needs one evictable block: b's second; a then finds both of its blocks, b only
    its first."""
    cached, uncached = Engine(model, infer=tiny.INFER), Engine(model, infer=OFF)
    alloc = cached.scheduler.alloc
    alloc.reserve(-1, (alloc.free_blocks - 6) * P)
    a, b, c = tiny.prompts([2 * P + 1] * 3, seed=11)
    got = [cached.generate([p], GREEDY)[0] for p in (a, b, a, c, a, b)]
    expected = uncached.generate([a, b, c], GREEDY)
    for k, (completion, reference) in enumerate(zip(got, [0, 1, 0, 2, 0, 1])):
        assert_same(completion, expected[reference], k)
    assert [completion.cached_tokens for completion in got] == [0, 0, 2 * P, 0, 2 * P, P]
    assert alloc.free_blocks == 6


def test_a_reused_block_loses_its_key_and_a_flush_drops_them_all():
    layout = CacheLayout(num_blocks=4, block_size=2, max_len=6)
    tokens = [5, 6, 7, 8, 9]
    keys = chain_keys(b"", tokens, 2)
    assert len(keys) == 2 and chain_keys(keys[0], tokens[2:], 2) == keys[1:]
    assert chain_keys(b"", [7, 8], 2) != keys[1:]  # the same tokens after another prefix
    alloc = BlockAllocator(layout)
    alloc.reserve(0, 5)
    alloc.register(0, keys)
    alloc.release(0)
    assert alloc.free_blocks == 3 and alloc.lookup(keys) == [1, 2] and alloc.cached_blocks == 2
    alloc.reserve(1, 4)  # the unkeyed block 3, then block 2 (evicted before 1: the later of its chain)
    assert alloc.blocks(1) == [3, 2] and alloc.lookup(keys) == [1] and alloc.cached_blocks == 1
    alloc.flush()
    assert alloc.lookup(keys) == [] and alloc.cached_blocks == 0 and alloc.free_blocks == 1


def test_load_weights_flushes_the_cache(model):
    new = weights(tiny.model(seed=4))
    prompt = tiny.prompts([2 * P + 3], seed=13)[0]
    engine = Engine(model, infer=tiny.INFER)
    assert engine.generate([prompt, prompt], GREEDY)[1].cached_tokens == 0  # admitted together
    assert engine.generate([prompt], GREEDY)[0].cached_tokens == 2 * P
    engine.load_weights(*new)
    (after,) = engine.generate([prompt], SEEDED)
    (fresh,) = Engine(tiny.model(seed=4), infer=tiny.INFER).generate([prompt], SEEDED)
    assert after.cached_tokens == 0
    assert_same(after, fresh, "new weights")


def test_mtp_drafts_and_outputs_equal_the_uncached_engine():
    """Depth D = 3 drafts: a cached block is reused only when the D tokens after it (read by its
    MTP latents) equal the prompt's.  b shares a's 2 blocks and the tail after them, c only the
    first block's tail, a repeated is a whole cached prompt (its last block and g^0 computed again)."""
    cfg = common.tiny_config(vocab_size=6, mtp_depth=3)
    model = common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=5)
    rng = np.random.default_rng(4)
    a = rng.integers(0, 6, 2 * P + 5).tolist()
    b = a[: 2 * P + 3] + rng.integers(0, 6, 4).tolist()
    c = a[: 2 * P] + [(a[2 * P] + 1) % 6] + a[2 * P + 1 :]
    prompts = [a, b, c, a]
    results = []
    for infer in (SPECULATIVE, dataclasses.replace(SPECULATIVE, prefix_cache=False)):
        engine = Engine(model, infer=infer)
        drafts = record_drafts(engine)
        outputs = [engine.generate([p], SEEDED)[0] for p in prompts]
        results.append((outputs, drafts, engine.speculative_stats))
    (got, got_drafts, stats), (expected, expected_drafts, _) = results
    assert 0 < stats["accepted"] < stats["drafted"]
    for k, (x, y) in enumerate(zip(got, expected)):
        assert_same(x, y, k)
    assert got_drafts == expected_drafts
    assert [x.cached_tokens for x in got] == [0, 2 * P, P, 2 * P]
