"""Training objectives against float64 numpy references (frontier_jax/train/losses.py and the
sequence-wise balance loss of frontier_jax/model/moe.py).

Tolerances: fp32 computations vs float64 references, rtol 1e-5 on per-token values (the
logsumexp of logits of size ~10 loses ~1e-7 relative) and rtol 1e-5 on sums of ~100 terms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.model.config import ModelConfig
from frontier_jax.model.moe import sequence_balance_loss
from frontier_jax.model.routing import route
from frontier_jax.train.losses import masked_sum, mtp_targets, token_cross_entropy

RTOL = 1e-5


def _logsumexp64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    top = z.max(-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[..., 0]


def _random_logits(rng, shape, scale=8.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------- cross-entropy
def test_token_cross_entropy_matches_float64_reference():
    rng = np.random.default_rng(0)
    logits = _random_logits(rng, (3, 7, 50))
    targets = rng.integers(0, 50, (3, 7)).astype(np.int32)
    ce, lse = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    lse_ref = _logsumexp64(logits)
    ce_ref = lse_ref - np.take_along_axis(logits.astype(np.float64), targets[..., None], -1)[..., 0]
    assert ce.shape == lse.shape == (3, 7)
    assert ce.dtype == lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ce), ce_ref, rtol=RTOL, atol=1e-5)
    assert np.all(np.asarray(ce) >= -1e-5)  # CE is a negative log-probability


def test_token_cross_entropy_is_computed_in_fp32_for_bf16_logits():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(_random_logits(rng, (2, 5, 300), scale=4.0), jnp.bfloat16)
    targets = rng.integers(0, 300, (2, 5)).astype(np.int32)
    ce, lse = token_cross_entropy(logits, jnp.asarray(targets))
    exact = np.asarray(logits.astype(jnp.float32)).astype(np.float64)  # the bf16 values, exactly
    lse_ref = _logsumexp64(exact)
    ce_ref = lse_ref - np.take_along_axis(exact, targets[..., None], -1)[..., 0]
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lse), lse_ref, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ce), ce_ref, rtol=RTOL, atol=1e-5)


def test_masked_sums_of_cross_entropy_and_z_loss_match_reference():
    rng = np.random.default_rng(2)
    logits = _random_logits(rng, (4, 16, 40))
    targets = rng.integers(0, 40, (4, 16)).astype(np.int32)
    mask = (rng.random((4, 16)) < 0.6).astype(np.int32)
    ce, lse = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    lse_ref = _logsumexp64(logits)
    ce_ref = lse_ref - np.take_along_axis(logits.astype(np.float64), targets[..., None], -1)[..., 0]
    total = masked_sum(ce, jnp.asarray(mask))
    np.testing.assert_allclose(float(total), (ce_ref * mask).sum(), rtol=RTOL)
    # (the step's normalisation of these sums is checked against numpy in
    # test_step.py::test_loss_terms_match_numpy_from_a_forward_pass)
    # z-loss sum: sum_t m_t lse_t^2
    z = masked_sum(lse * lse, jnp.asarray(mask))
    np.testing.assert_allclose(float(z), (lse_ref**2 * mask).sum(), rtol=RTOL)
    # masked positions contribute nothing, whatever their value
    poisoned = jnp.where(jnp.asarray(mask) == 1, ce, 1e6)
    np.testing.assert_allclose(float(masked_sum(poisoned, jnp.asarray(mask))), float(total), rtol=1e-6)


# ---------------------------------------------------------------------------- MTP
def _mtp_reference(targets, loss_mask, segment_ids, depth):
    b, t = targets.shape
    out_t = np.zeros((depth, b, t), np.int64)
    out_m = np.zeros((depth, b, t), np.int64)
    for k in range(1, depth + 1):
        for i in range(b):
            for j in range(t):
                if j + k >= t:  # the target lies past the end of the row
                    continue
                out_t[k - 1, i, j] = targets[i, j + k]
                same_doc = segment_ids is None or segment_ids[i, j + k] == segment_ids[i, j]
                out_m[k - 1, i, j] = int(loss_mask[i, j + k] == 1 and same_doc)
    return out_t, out_m


def _packed_rows(rng, b, t):
    """Rows of several documents with a padded tail, like the packer's (mask_documents=True)."""
    seg = np.zeros((b, t), np.int32)
    for i in range(b):
        j, doc = 0, 1
        end = t - rng.integers(0, t // 3)  # padding tail
        while j < end:
            n = int(rng.integers(1, 8))
            seg[i, j : min(j + n, end)] = doc
            j, doc = j + n, doc + 1
    loss_mask = (seg > 0).astype(np.int32)
    loss_mask[rng.random((b, t)) < 0.1] = 0  # a few more masked targets
    targets = rng.integers(0, 100, (b, t)).astype(np.int32)
    return targets, loss_mask, seg


@pytest.mark.parametrize("with_segments", [False, True])
@pytest.mark.parametrize("depth", [1, 3])
def test_mtp_targets_match_naive_loop(with_segments, depth):
    rng = np.random.default_rng(3 + depth)
    targets, loss_mask, seg = _packed_rows(rng, 5, 24)
    segment_ids = seg if with_segments else None
    got_t, got_m = mtp_targets(
        jnp.asarray(targets),
        jnp.asarray(loss_mask),
        None if segment_ids is None else jnp.asarray(segment_ids),
        depth,
    )
    ref_t, ref_m = _mtp_reference(targets, loss_mask, segment_ids, depth)
    assert got_t.shape == got_m.shape == (depth, 5, 24)
    np.testing.assert_array_equal(np.asarray(got_m), ref_m)
    # targets must be right wherever they count
    np.testing.assert_array_equal(np.where(ref_m == 1, np.asarray(got_t), 0), np.where(ref_m == 1, ref_t, 0))
    # nothing past the row is ever a target
    for k in range(1, depth + 1):
        assert not np.asarray(got_m)[k - 1, :, 24 - k :].any()
    if with_segments:  # and no target crosses a document boundary
        for k in range(1, depth + 1):
            crossing = np.zeros_like(seg, bool)
            crossing[:, :-k] = seg[:, k:] != seg[:, :-k]
            assert not np.asarray(got_m)[k - 1][crossing].any()


# ---------------------------------------------------------------- balance loss
def _balance_reference(experts, scores, token_mask, n_experts, k):
    """sum over the rows holding real tokens of sum_i f_i P_i (float64 loops)."""
    b, t = token_mask.shape
    experts = experts.reshape(b, t, k)
    scores = scores.reshape(b, t, n_experts).astype(np.float64)
    per_row = []
    for r in range(b):
        real = np.flatnonzero(token_mask[r])
        n = len(real)
        if n == 0:
            continue
        f = np.zeros(n_experts)
        p = np.zeros(n_experts)
        for tok in real:
            for e in experts[r, tok]:
                f[e] += 1
            p += scores[r, tok] / scores[r, tok].sum()
        f *= n_experts / (k * n)
        p /= n
        per_row.append((f * p).sum())
    return np.sum(per_row)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_sequence_balance_loss_matches_reference(scoring):
    cfg = ModelConfig(
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, scoring_func=scoring
    ).validate()
    rng = np.random.default_rng(5)
    b, t = 4, 20
    logits = jnp.asarray(2.0 * rng.standard_normal((b * t, 8)), jnp.float32)
    bias = jnp.asarray(0.3 * rng.standard_normal(8), jnp.float32)
    routing = route(logits, bias, cfg)
    token_mask = np.ones((b, t), np.int32)
    token_mask[0, 15:] = 0
    token_mask[2, :4] = 0
    token_mask[2, 10:] = 0
    token_mask[3] = 0  # a row without real tokens adds nothing
    got = sequence_balance_loss(routing, jnp.asarray(token_mask), cfg)
    ref = _balance_reference(np.asarray(routing.experts), np.asarray(routing.scores), token_mask, 8, 3)
    np.testing.assert_allclose(float(got), ref, rtol=RTOL)
    # masked tokens do not count: changing their routing leaves the loss unchanged
    other = route(-logits, bias, cfg)
    # row 2's tokens 10..19 (flat 50..59) are masked: give them a different routing
    mixed = jax.tree.map(lambda a, o: a.at[50:].set(o[50:]), routing, other)
    np.testing.assert_allclose(
        float(sequence_balance_loss(mixed, jnp.asarray(token_mask), cfg)), float(got), rtol=1e-6
    )


def test_sequence_balance_loss_is_one_for_perfectly_balanced_uniform_routing():
    """f_i = 1 for all experts and sum_i P_i = 1  =>  L = 1 (the value the loss is normalised to)."""
    cfg = ModelConfig(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1).validate()
    t = 8
    experts = np.array([[0, 1], [2, 3]] * (t // 2), np.int32)  # each expert exactly t/2 times
    scores = np.full((t, 4), 0.5, np.float32)
    routing = route(jnp.zeros((t, 4)), jnp.zeros(4), cfg)._replace(
        experts=jnp.asarray(experts), scores=jnp.asarray(scores)
    )
    got = sequence_balance_loss(routing, jnp.ones((1, t), jnp.int32), cfg)
    np.testing.assert_allclose(float(got), 1.0, rtol=1e-6)
    # all tokens on experts {0, 1} with all affinity there: f = (2, 2, 0, 0), P = (.5, .5, 0, 0)
    skewed = routing._replace(
        experts=jnp.asarray(np.array([[0, 1]] * t, np.int32)),
        scores=jnp.asarray(np.tile(np.array([0.9, 0.9, 0.0, 0.0], np.float32), (t, 1))),
    )
    np.testing.assert_allclose(
        float(sequence_balance_loss(skewed, jnp.ones((1, t), jnp.int32), cfg)), 2.0, rtol=1e-6
    )
