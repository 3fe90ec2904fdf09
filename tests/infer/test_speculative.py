"""MTP speculative decoding: greedy output identical to plain greedy decoding, the engine's
drafts equal to the training forward's MTP argmax, and every token the acceptance rule emits
(the first, the one after an accepted draft, the bonus token after all drafts are kept)
distributed as the model's filtered softmax."""

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
SPECULATIVE = InferConfig(**{**INFER.__dict__, "speculative": "mtp"})
DRAWS = 20_000
PLAIN = SamplingParams(temperature=1.0)
FILTERED = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)


def record_drafts(engine: Engine) -> list[tuple[list[int], list[int]]]:
    """Wraps the engine's drafting (step 1 of `speculative.py`, which runs unchanged) to record
    (t_0 .. t_{L-1}, d_1 .. d_D) of every row of every speculative step."""
    records, draft = [], engine._mtp.draft

    def recorded(state, cache, rows):
        drafts, cache = draft(state, cache, rows)
        records.extend((r.prompt_ids + r.output_ids, d.tolist()) for r, d in zip(rows, drafts))
        return drafts, cache

    engine._mtp.draft = recorded
    return records


@pytest.fixture(scope="module")
def greedy_runs():
    """A depth-3 MTP model decoded greedily, plainly and speculatively (drafts recorded).
    Depth 3: depth 3's context at position L-3 reads t_L, which is only drafted (d_1)."""
    # a small vocabulary, so that the random MTP modules' drafts are sometimes accepted
    cfg = common.tiny_config(vocab_size=6, mtp_depth=3)
    model = common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=5)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (1, 12, 7)]
    params = SamplingParams(max_new_tokens=16)
    plain = Engine(model, infer=INFER).generate(prompts, params)
    engine = Engine(model, infer=SPECULATIVE)
    drafts = record_drafts(engine)
    spec = engine.generate(prompts, params)
    return model, plain, spec, engine.speculative_stats, drafts


def test_mtp_speculative_greedy_equals_plain_greedy(greedy_runs):
    _, plain, spec, s, _ = greedy_runs
    for a, b in zip(plain, spec):
        assert b.output_ids == a.output_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-5, atol=1e-5)
    assert 0 < s["accepted"] < s["drafted"], s  # both the accept and the rejection paths ran
    assert s["tokens_per_forward"] > 1


def test_engine_drafts_are_the_training_forward_mtp_argmax(greedy_runs):
    """Draft d_k of a sequence t_0 .. t_{L-1} is MTP depth k's argmax at position L-2 of the
    training forward (`Transformer.forward`, no cache) over t_0 .. t_{L-1}, d_1 .. d_{D-1}:
    depth k there reads g^{k-1}_{L-2} and t_{L-2+k} (d_{k-1} for k > 1).  Greedy output does
    not depend on the drafts, so only this catches a draft chain fed the wrong tokens."""
    model, _, _, _, records = greedy_runs
    depth = model.cfg.mtp_depth
    assert len(records) > 10 and {len(seq) for seq, _ in records} >= {2, 13}  # first draft after a prompt
    ids = np.zeros((len(records), INFER.max_len + depth), np.int32)
    for b, (seq, drafts) in enumerate(records):
        ids[b, : len(seq) + depth - 1] = seq + drafts[:-1]  # trailing zeros: later positions, unread
    mtp_logits = np.asarray(
        common.jit(lambda m, x: m.forward(x).mtp_logits)(model, jnp.asarray(ids))
    )  # [D, B, T, V]
    logits = mtp_logits[:, np.arange(len(records)), [len(seq) - 2 for seq, _ in records]]  # [D, R, V]
    drafts = np.array([d for _, d in records]).T  # [D, R]
    # argmax up to float32 rounding of the cached (paged, absorbed) and uncached paths
    gap = logits.max(-1) - np.take_along_axis(logits, drafts[..., None], axis=-1)[..., 0]
    wrong = [(records[r], int(k) + 1) for k, r in zip(*np.nonzero(gap > 1e-4))]
    assert not wrong, f"{len(wrong)} of {gap.size} drafts not the argmax, e.g. (t, d), depth: {wrong[0]}"


@pytest.mark.slow  # 50 s of CI; fp32 drafting runs by default
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
    engine = Engine(model, infer=SPECULATIVE)
    spec = engine.generate(prompts, params)
    for a, b in zip(plain, spec):
        assert len(b.output_ids) == 12 and b.output_ids[0] == a.output_ids[0]
    assert engine.speculative_stats["drafted"] > 0


def speculative_draws(logits: np.ndarray, drafts: np.ndarray, params: SamplingParams):
    """`accept` on DRAWS copies of one verify forward (logits [D+1, V], drafts [D]), each with
    its own seed -> (kept drafts [DRAWS], tokens [DRAWS, D+1]) as numpy."""
    n, (t, vocab) = DRAWS, logits.shape
    kept, tokens, _ = accept(
        jnp.asarray(np.broadcast_to(logits, (n, t, vocab))),
        jnp.asarray(np.broadcast_to(drafts, (n, t - 1))),
        jnp.full((n,), params.temperature),
        jnp.full((n,), params.top_k, jnp.int32),
        jnp.full((n,), params.top_p),
        jnp.arange(n, dtype=jnp.uint32),
        jnp.zeros((n,), jnp.int32),
    )
    return np.asarray(kept), np.asarray(tokens)


def assert_follows(draws: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Chi-square goodness of fit of the token draws to the probabilities `expected` [V]:
    no draw where expected is 0, p-value > 1e-3 over the rest."""
    counts = np.bincount(draws, minlength=len(expected))
    assert counts[expected == 0].sum() == 0, f"{what}: tokens outside the filtered support"
    keep = expected > 0
    chi2 = ((counts[keep] - len(draws) * expected[keep]) ** 2 / (len(draws) * expected[keep])).sum()
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3, f"{what}: chi2={chi2:.1f} over {len(draws)} draws"


@pytest.mark.parametrize(
    "params, draft_rank",
    [
        (FILTERED, 3),
        pytest.param(FILTERED, 0, marks=pytest.mark.slow),
        pytest.param(PLAIN, 0, marks=pytest.mark.slow),
        pytest.param(PLAIN, 3, marks=pytest.mark.slow),
    ],
    ids=["filtered-unlikely_draft", "filtered-likely_draft", "plain-likely_draft", "plain-unlikely_draft"],
)
def test_first_speculatively_sampled_token_follows_the_filtered_softmax(params, draft_rank):
    rng = np.random.default_rng(0)
    vocab, depth = 10, 2
    logits = rng.normal(0, 1.5, (depth + 1, vocab)).astype(np.float32)
    drafts = np.array([np.argsort(-logits[0])[draft_rank], 1], np.int32)
    kept, tokens = speculative_draws(logits, drafts, params)
    expected = filtered_softmax(logits[0], params.temperature, params.top_k, params.top_p)
    assert_follows(tokens[:, 0], expected, "first token")
    # the draft is kept exactly when the emitted first token is the draft
    np.testing.assert_array_equal(kept > 0, tokens[:, 0] == drafts[0])


@pytest.mark.parametrize("params", [FILTERED, PLAIN], ids=["filtered", "plain"])
def test_tokens_after_kept_drafts_follow_the_filtered_softmax(params):
    """Drafts d_1, d_2 (each the argmax of its target, so often kept): given d_1 kept, the second
    token follows p_1 (d_2 kept, or a draw from the residual); given both kept, the bonus token
    follows p_2; and the kept counts are 0, 1, 2 with probabilities 1 - p_0(d_1),
    p_0(d_1) (1 - p_1(d_2)), p_0(d_1) p_1(d_2)."""
    rng = np.random.default_rng(7)  # both drafts kept in 16% (plain) and 27% (filtered) of draws
    vocab, depth = 10, 2
    logits = rng.normal(0, 1.5, (depth + 1, vocab)).astype(np.float32)
    drafts = logits[:depth].argmax(-1).astype(np.int32)
    kept, tokens = speculative_draws(logits, drafts, params)
    p = [filtered_softmax(z, params.temperature, params.top_k, params.top_p) for z in logits]
    a0, a1 = p[0][drafts[0]], p[1][drafts[1]]
    assert_follows(kept, np.array([1 - a0, a0 * (1 - a1), a0 * a1]), "kept drafts")
    assert_follows(tokens[kept >= 1, 1], p[1], "second token given the first draft kept")
    # the bonus token is d_2 with probability p_2(d_2) > 0.1: a bonus drawn without it is caught
    assert (kept == depth).sum() > 3_000 and p[depth][drafts[-1]] > 0.1
    assert_follows(tokens[kept == depth, depth], p[depth], "bonus token after every draft kept")
