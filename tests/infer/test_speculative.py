"""MTP speculative decoding: greedy output identical to plain greedy decoding, and the
acceptance rule's emitted token distributed as the model's filtered softmax."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from frontier_jax.infer import Engine, InferConfig, SamplingParams
from frontier_jax.infer.speculative import accept
from frontier_jax.model import Transformer
from frontier_jax.precision import get_policy
from tests.infer.test_sampling import filtered_softmax
from tests.model import common

INFER = InferConfig(block_size=8, max_seqs=4, max_len=40, prefill_chunk=5)
DRAWS = 20_000


def test_mtp_speculative_greedy_equals_plain_greedy():
    depth = 2  # a chain: depth 2 drafts from depth 1's prediction
    # a small vocabulary, so that the random MTP modules' drafts are sometimes accepted
    cfg = common.tiny_config(vocab_size=6, mtp_depth=depth)
    model = common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=5)
    rng = np.random.default_rng(depth)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (1, 12, 7)]
    params = SamplingParams(max_new_tokens=16)
    plain = Engine(model, infer=INFER).generate(prompts, params)
    engine = Engine(model, infer=InferConfig(**{**INFER.__dict__, "speculative": "mtp"}))
    spec = engine.generate(prompts, params)
    for a, b in zip(plain, spec):
        assert b.output_ids == a.output_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-5, atol=1e-5)
    s = engine.speculative_stats
    assert 0 < s["accepted"] < s["drafted"], s  # both the accept and the rejection paths ran
    assert s["tokens_per_forward"] > 1


def test_mtp_speculative_decoding_runs_a_bf16_model():
    # a bf16 policy's MTP modules return bf16 hidden states while the engine feeds g^0 in fp32
    # (once a scan-carry dtype error on the H200); greedy output: that of plain bf16 decoding
    # up to bf16 ties, so the first token (prefill, same program) must agree and every request
    # must run to its length
    cfg = common.tiny_config(vocab_size=6, mtp_depth=2)
    model = common.build(lambda: Transformer(cfg, policy=get_policy("bf16"), rngs=nnx.Rngs(0)), seed=5)
    prompts = [[1, 2, 3], [4, 5, 0, 1, 2, 3, 4]]
    params = SamplingParams(max_new_tokens=12)
    plain = Engine(model, infer=INFER).generate(prompts, params)
    engine = Engine(model, infer=InferConfig(**{**INFER.__dict__, "speculative": "mtp"}))
    spec = engine.generate(prompts, params)
    for a, b in zip(plain, spec):
        assert len(b.output_ids) == 12 and b.output_ids[0] == a.output_ids[0]
    assert engine.speculative_stats["drafted"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("draft_rank", [0, 3], ids=["likely_draft", "unlikely_draft"])
@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=6, top_p=0.9)],
    ids=["plain", "filtered"],
)
def test_first_speculatively_sampled_token_follows_the_filtered_softmax(params, draft_rank):
    rng = np.random.default_rng(0)
    vocab, depth = 10, 2
    logits = rng.normal(0, 1.5, (depth + 1, vocab)).astype(np.float32)
    drafts = np.array([np.argsort(-logits[0])[draft_rank], 1], np.int32)
    n = DRAWS
    kept, tokens, _ = accept(
        jnp.asarray(np.broadcast_to(logits, (n, depth + 1, vocab))),
        jnp.asarray(np.broadcast_to(drafts, (n, depth))),
        jnp.full((n,), params.temperature),
        jnp.full((n,), params.top_k, jnp.int32),
        jnp.full((n,), params.top_p),
        jnp.arange(n, dtype=jnp.uint32),
        jnp.zeros((n,), jnp.int32),
    )
    first = np.asarray(tokens)[:, 0]
    expected = filtered_softmax(logits[0], params.temperature, params.top_k, params.top_p)
    counts = np.bincount(first, minlength=vocab)
    assert counts[expected == 0].sum() == 0
    keep = expected > 0
    chi2 = ((counts[keep] - n * expected[keep]) ** 2 / (n * expected[keep])).sum()
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3, f"chi2={chi2:.1f}"
    # the draft is kept exactly when the emitted first token is the draft
    np.testing.assert_array_equal(np.asarray(kept) > 0, first == drafts[0])
