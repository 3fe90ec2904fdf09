"""Multi-head Latent Attention against the float64 per-head reference, plus causality, document
masking, decode-with-offset and latent shapes."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model.mla import MLA

from . import common
from . import reference as ref

B, T = 2, 8
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 2, 2]])


def _mla(q_lora_rank=16, seed=0, **overrides):
    cfg = common.tiny_config(q_lora_rank=q_lora_rank, **overrides)
    return cfg, common.build(lambda: MLA(cfg, policy=common.FP32, rngs=nnx.Rngs(0)), seed)


_forward = common.jit(lambda m, x, pos, seg: m(x, pos, seg))
_forward_noseg = common.jit(lambda m, x, pos: m(x, pos))


def _inputs(seed, cfg):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, cfg.hidden_size))
    pos = np.tile(np.arange(T), (B, 1)) + np.array([[0], [37]])  # second row starts at 37
    return x, pos


@pytest.mark.parametrize("q_lora_rank", [16, 0])
@pytest.mark.parametrize("packed", [False, True])
def test_mla_matches_reference(q_lora_rank, packed):
    # YaRN on (factor 4, amplitude != 1, softmax scale corrected).  fp32 vs float64:
    # rtol 1e-4, atol 1e-5 on O(1) outputs; padding rows (segment 0) are only checked to be finite.
    cfg, mla = _mla(q_lora_rank, seed=q_lora_rank)
    x, pos = _inputs(1, cfg)
    seg = SEGMENTS if packed else None
    if packed:
        pos = np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]])  # restart per document
        got = np.asarray(_forward(mla, jnp.asarray(x, jnp.float32), jnp.asarray(pos), jnp.asarray(seg)))
    else:
        got = np.asarray(_forward_noseg(mla, jnp.asarray(x, jnp.float32), jnp.asarray(pos)))
    want = ref.mla(common.params_f64(mla), x, pos, seg, cfg)
    assert np.isfinite(got).all()
    real = np.ones((B, T), bool) if seg is None else seg != 0
    common.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_mla_is_causal():
    # changing token 5 leaves outputs 0..4 bitwise-close (atol 1e-6) and changes outputs 5..7
    cfg, mla = _mla()
    x, pos = _inputs(2, cfg)
    x2 = x.copy()
    x2[:, 5] += 3.0
    run = lambda a: np.asarray(_forward_noseg(mla, jnp.asarray(a, jnp.float32), jnp.asarray(pos)))
    y, y2 = run(x), run(x2)
    np.testing.assert_allclose(y2[:, :5], y[:, :5], rtol=0, atol=1e-6)
    assert (np.abs(y2[:, 5:] - y[:, 5:]).max(axis=-1) > 1e-3).all()


def test_document_masking_isolates_segments():
    # tokens of segment 2 are unaffected by the content of segment 1 (atol 1e-6), even though
    # segment 1 comes first in the row; segment-1 outputs do change
    cfg, mla = _mla()
    x, _ = _inputs(3, cfg)
    seg = jnp.asarray(SEGMENTS)
    pos = jnp.asarray(np.tile(np.arange(T), (B, 1)))
    x2 = x.copy()
    first = SEGMENTS == 1
    x2[first] = np.random.default_rng(4).standard_normal((first.sum(), cfg.hidden_size))
    run = lambda a: np.asarray(_forward(mla, jnp.asarray(a, jnp.float32), pos, seg))
    y, y2 = run(x), run(x2)
    second = SEGMENTS == 2
    np.testing.assert_allclose(y2[second], y[second], rtol=0, atol=1e-6)
    assert (np.abs(y2[first] - y[first]).max(axis=-1) > 1e-3).all()
    assert np.isfinite(y2).all()


def test_decode_with_cached_latent_equals_full_sequence():
    # queries for the last 3 tokens against the latent cache of all 8 (q_offset = 5) reproduce the
    # full-sequence outputs of those tokens: rtol 1e-5, atol 1e-6
    cfg, mla = _mla()
    x, pos = _inputs(5, cfg)
    x32, pos = jnp.asarray(x, jnp.float32), jnp.asarray(pos)
    full = np.asarray(_forward_noseg(mla, x32, pos))

    @common.jit
    def decode(m, x, pos):
        c_kv, k_rope = m.latent(x, pos)
        q_nope, q_rope = m.query(x[:, 5:], pos[:, 5:])
        return m.attend(q_nope, q_rope, c_kv, k_rope, q_offset=5)

    np.testing.assert_allclose(np.asarray(decode(mla, x32, pos)), full[:, 5:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_lora_rank", [16, 0])
def test_latent_and_query_shapes(q_lora_rank):
    cfg, mla = _mla(q_lora_rank)
    x = jnp.ones((B, T, cfg.hidden_size))
    pos = jnp.zeros((B, T), jnp.int32)
    c_kv, k_rope, q_nope, q_rope, out = common.jit(
        lambda m, x, pos: (*m.latent(x, pos), *m.query(x, pos), m(x, pos))
    )(mla, x, pos)
    assert c_kv.shape == (B, T, cfg.kv_lora_rank)
    assert k_rope.shape == (B, T, cfg.qk_rope_head_dim)
    assert q_nope.shape == (B, T, cfg.num_heads, cfg.qk_nope_head_dim)
    assert q_rope.shape == (B, T, cfg.num_heads, cfg.qk_rope_head_dim)
    assert out.shape == (B, T, cfg.hidden_size)
    # the cache is d_c + d_h^R numbers per token, and c_kv is RMS-normalised (times its weight)
    p = common.params_f64(mla)
    want_c = ref.rms_norm(np.ones(cfg.hidden_size) @ p["wkv_a"]["kernel"], p["kv_norm"]["scale"], 1e-6)
    common.assert_close(c_kv[0, 0], want_c, rtol=1e-5, atol=1e-6)
    if q_lora_rank:
        assert not hasattr(mla, "wq")
    else:
        assert not hasattr(mla, "wq_a")


@pytest.mark.parametrize("q_lora_rank", [16, 0])
def test_latent_norms_use_eps_1e_6_whatever_rms_norm_eps(q_lora_rank):
    # DeepSeek's code and transformers build q_a_layernorm / kv_a_layernorm with eps 1e-6; with
    # rms_norm_eps = 0.1 and latents of mean square ~1e-2 the other eps would change c^KV and q
    # by tens of percent.  fp32 vs float64, rtol 1e-5.
    cfg, mla = _mla(q_lora_rank, rms_norm_eps=0.1)
    x = 0.1 * np.random.default_rng(3).standard_normal((B, T, cfg.hidden_size))
    pos = np.tile(np.arange(T), (B, 1))
    c_kv, _, q_nope, _ = common.jit(lambda m, x, pos: (*m.latent(x, pos), *m.query(x, pos)))(
        mla, jnp.asarray(x, jnp.float32), jnp.asarray(pos)
    )
    p = common.params_f64(mla)
    common.assert_close(
        c_kv, ref.rms_norm(x @ p["wkv_a"]["kernel"], p["kv_norm"]["scale"], 1e-6), rtol=1e-5, atol=1e-6
    )
    if q_lora_rank:
        c_q = ref.rms_norm(x @ p["wq_a"]["kernel"], p["q_norm"]["scale"], 1e-6)
        want_q = np.einsum("btc,chd->bthd", c_q, p["wq_b"]["kernel"])[..., : cfg.qk_nope_head_dim]
        common.assert_close(q_nope, want_q, rtol=1e-5, atol=1e-6)
