"""Attention mask semantics (causal, q_offset, packed segments, padding) and the xla attention core
against a per-query float64 softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.model.attention import attention_mask, chunk_attention, dot_product_attention

from . import common
from . import reference as ref

_mask = common.fast_jit(attention_mask, static_argnums=(0, 1))
_attend = common.fast_jit(dot_product_attention, static_argnames=("scale", "impl"))


def _expected_mask(t, s, q_offset=0, q_seg=None, kv_seg=None):
    bsz = 1 if q_seg is None else q_seg.shape[0]
    out = np.zeros((bsz, 1, t, s), bool)
    for b in range(bsz):
        for i in range(t):
            for j in range(s):
                out[b, 0, i, j] = ref.may_attend(
                    i, j, q_offset, None if q_seg is None else q_seg[b], None if kv_seg is None else kv_seg[b]
                )
    return out


def test_mask_is_causal_without_segments():
    got = np.asarray(_mask(5, 5, None, None))
    assert got.shape == (1, 1, 5, 5)
    np.testing.assert_array_equal(got[0, 0], np.tril(np.ones((5, 5), bool)))


@pytest.mark.parametrize("q_offset", [0, 2, 4])
def test_mask_with_q_offset_sees_cached_prefix(q_offset):
    # 3 queries at absolute positions q_offset .. q_offset+2 over 7 keys
    got = np.asarray(_mask(3, 7, None, None, q_offset))
    np.testing.assert_array_equal(got, _expected_mask(3, 7, q_offset))
    # query i sees exactly keys 0 .. i + q_offset
    np.testing.assert_array_equal(got[0, 0].sum(-1), np.arange(3) + q_offset + 1)


def test_mask_q_offset_may_be_a_traced_array():
    got = jax.jit(lambda o: attention_mask(2, 6, None, None, o))(jnp.asarray(3))
    np.testing.assert_array_equal(np.asarray(got), _expected_mask(2, 6, 3))


def test_mask_packed_segments_and_padding():
    seg = np.array([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 1, 1, 1]])
    got = np.asarray(_mask(7, 7, jnp.asarray(seg), jnp.asarray(seg)))
    np.testing.assert_array_equal(got, _expected_mask(7, 7, 0, seg, seg))
    # spot checks: token 2 (segment 2) does not see segment 1; padding sees nothing at all
    assert not got[0, 0, 2, :2].any() and got[0, 0, 2, 2]
    assert not got[0, 0, 5:].any()
    assert not got[0, 0, :, 5:].any()


def test_mask_segments_with_q_offset():
    kv_seg = np.array([[1, 1, 1, 2, 2, 2]])
    q_seg = kv_seg[:, 4:]
    got = np.asarray(_mask(2, 6, jnp.asarray(q_seg), jnp.asarray(kv_seg), 4))
    np.testing.assert_array_equal(got, _expected_mask(2, 6, 4, q_seg, kv_seg))
    np.testing.assert_array_equal(got[0, 0], [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]])


def _random_qkv(rng, b=2, t=6, s=6, h=2, d=5, dv=3):
    return (
        rng.standard_normal((b, t, h, d)),
        rng.standard_normal((b, s, h, d)),
        rng.standard_normal((b, s, h, dv)),
    )


def test_xla_attention_matches_reference_with_padding_rows():
    # fp32 vs float64 per-query softmax: rtol 1e-5, atol 1e-6; fully masked (padding) rows must be
    # finite (no NaN) and are not compared
    rng = np.random.default_rng(0)
    q, k, v = _random_qkv(rng)
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 0, 0]])
    got = np.asarray(
        _attend(
            *(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
            scale=0.37,
            q_segment_ids=jnp.asarray(seg),
            kv_segment_ids=jnp.asarray(seg),
        )
    )
    assert np.isfinite(got).all()
    for b in range(2):
        want = ref.attention(q[b], k[b], v[b], 0.37, 0, seg[b], seg[b])
        real = seg[b] != 0
        np.testing.assert_allclose(got[b][real], want[real], rtol=1e-5, atol=1e-6)


def test_xla_attention_matches_reference_with_q_offset():
    rng = np.random.default_rng(1)
    q, k, v = _random_qkv(rng, t=2, s=7)
    got = np.asarray(_attend(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), scale=0.5, q_offset=5))
    for b in range(2):
        np.testing.assert_allclose(got[b], ref.attention(q[b], k[b], v[b], 0.5, 5), rtol=1e-5, atol=1e-6)


def test_gradient_is_finite_with_fully_masked_rows():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(a, jnp.float32) for a in _random_qkv(rng))
    seg = jnp.asarray([[1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 2, 0]])

    def loss(q, k, v):
        return dot_product_attention(q, k, v, scale=0.4, q_segment_ids=seg, kv_segment_ids=seg).sum()

    for g in common.fast_jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v):
        assert np.isfinite(np.asarray(g)).all()


def test_attention_output_dtype_and_shape():
    q = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    v = jnp.ones((1, 4, 2, 5), jnp.bfloat16)
    out = _attend(q, q[:, :1].repeat(4, 1), v, scale=0.1, q_offset=1)
    assert out.shape == (1, 3, 2, 5) and out.dtype == jnp.bfloat16


def test_segment_ids_must_be_given_for_both_sides():
    x = jnp.ones((1, 2, 1, 4))
    with pytest.raises(ValueError, match="segment_ids"):
        dot_product_attention(x, x, x, scale=1.0, q_segment_ids=jnp.ones((1, 2), jnp.int32))


def test_unknown_impl_raises():
    x = jnp.ones((1, 2, 1, 4))
    with pytest.raises(ValueError, match=r"impl\.attention"):
        dot_product_attention(x, x, x, scale=1.0, impl="flash")


def test_tokamax_impl_without_the_package_names_the_setting():
    import importlib.util

    if importlib.util.find_spec("tokamax") is not None:
        pytest.skip("tokamax installed")
    x = jnp.ones((1, 2, 1, 4))
    with pytest.raises(ImportError, match=r"impl\.attention"):
        dot_product_attention(x, x, x, scale=1.0, impl="tokamax")


def test_chunk_attention_equals_one_softmax_over_prefix_and_chunk():
    """`chunk_attention` (two flash calls merged by log-sum-exp; their XLA implementation here)
    against a per-query float64 softmax over the row's prefix keys 0..o_b-1 and the chunk's keys
    up to the query: rows with no prefix, a padded row, a row with no real token, v narrower than
    q/k.  Tolerance 1e-5 absolute (fp32)."""
    rng = np.random.default_rng(0)
    b, t, s, h, d, dv, scale = 4, 6, 16, 2, 5, 3, 0.4
    q, k_new, k_pre = (rng.normal(size=shape) for shape in ((b, t, h, d), (b, t, h, d), (b, s, h, d)))
    v_new, v_pre = rng.normal(size=(b, t, h, dv)), rng.normal(size=(b, s, h, dv))
    offsets, counts = np.array([0, 7, 16, 3]), np.array([6, 4, 6, 0])
    out = chunk_attention(
        jnp.asarray(q, jnp.float32),
        (jnp.asarray(k_new, jnp.float32), jnp.asarray(v_new, jnp.float32)),
        (jnp.asarray(k_pre, jnp.float32), jnp.asarray(v_pre, jnp.float32)),
        new_lengths=jnp.asarray(counts),
        prefix_lengths=jnp.asarray(offsets),
        scale=scale,
        implementation="xla",
    )
    for row in range(b):
        for i in range(t):
            if i >= counts[row]:
                np.testing.assert_array_equal(np.asarray(out[row, i]), 0.0)
                continue
            keys = np.concatenate([k_pre[row, : offsets[row]], k_new[row, : i + 1]])
            values = np.concatenate([v_pre[row, : offsets[row]], v_new[row, : i + 1]])
            scores = scale * np.einsum("hd,shd->hs", q[row, i], keys)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            expected = np.einsum("hs,shv->hv", p / p.sum(-1, keepdims=True), values)
            np.testing.assert_allclose(np.asarray(out[row, i]), expected, atol=1e-5)
