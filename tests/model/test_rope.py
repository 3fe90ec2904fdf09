"""RoPE + YaRN: frequencies, amplitude and softmax scale against the float64 reference and hand
computed numbers; rotation properties (norm, relative position, decode offset)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.model.config import ModelConfig, RopeScalingConfig
from frontier_jax.model.rope import (
    RotaryEmbedding,
    rope_amplitude,
    rope_frequencies,
    softmax_scale,
    yarn_mscale,
)

from . import common
from . import reference as ref

# RotaryEmbedding is a frozen (hashable) dataclass: a static argument
_apply = common.fast_jit(lambda rot, x, pos: rot(x, pos), static_argnums=0)


def _cfg(rope_dim=64, theta=10000.0, scaling=None, nope=128):
    return ModelConfig(
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=nope,
        rope_theta=theta,
        rope_scaling=scaling or RopeScalingConfig(),
    ).validate()


def _yarn(factor, beta_fast=32.0, beta_slow=1.0, original=4096, mscale=1.0, mscale_all_dim=0.0):
    return RopeScalingConfig(
        type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )


DEEPSEEK_V3_YARN = _yarn(40.0, 32.0, 1.0, 4096, mscale=1.0, mscale_all_dim=1.0)


@pytest.mark.parametrize("dim,theta", [(8, 10000.0), (64, 10000.0), (16, 500000.0)])
def test_frequencies_without_yarn_match_reference(dim, theta):
    # float64 on both sides: rtol 1e-12
    np.testing.assert_allclose(
        rope_frequencies(_cfg(dim, theta)), ref.base_frequencies(dim, theta), rtol=1e-12
    )


@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0, 40.0])
@pytest.mark.parametrize("beta_fast,beta_slow", [(32.0, 1.0), (16.0, 2.0), (64.0, 0.5)])
@pytest.mark.parametrize("dim,original", [(64, 4096), (16, 256)])
def test_yarn_frequencies_match_reference(factor, beta_fast, beta_slow, dim, original):
    cfg = _cfg(dim, scaling=_yarn(factor, beta_fast, beta_slow, original))
    expected = ref.yarn_frequencies(dim, 10000.0, factor, original, beta_fast, beta_slow)
    np.testing.assert_allclose(rope_frequencies(cfg), expected, rtol=1e-12)  # float64 both sides


def test_yarn_frequencies_deepseek_v3_by_hand():
    # d_R = 64, theta = 1e4, L0 = 4096: r(32) = 64 ln(4096 / (64 pi)) / (2 ln 1e4) = 10.47 -> lo = 10,
    # r(1) = 64 ln(4096 / (2 pi)) / (2 ln 1e4) = 22.51 -> hi = 23.  So pairs 0..10 keep f_i, pairs
    # 23..31 use f_i / 40 and pair i in between uses the blend with gamma = (i - 10) / 13.
    f = 10000.0 ** (-np.arange(0, 64, 2) / 64.0)
    got = rope_frequencies(_cfg(64, scaling=DEEPSEEK_V3_YARN))
    np.testing.assert_allclose(got[:11], f[:11], rtol=1e-12)
    np.testing.assert_allclose(got[23:], f[23:] / 40.0, rtol=1e-12)
    for i in range(11, 23):
        gamma = (i - 10) / 13
        np.testing.assert_allclose(got[i], f[i] / 40 * gamma + f[i] * (1 - gamma), rtol=1e-12)


def test_yarn_with_factor_one_leaves_frequencies_unchanged():
    np.testing.assert_allclose(
        rope_frequencies(_cfg(32, scaling=_yarn(1.0))), ref.base_frequencies(32, 10000.0), rtol=1e-12
    )


def test_softmax_scale_and_amplitude_deepseek_v3_by_hand():
    # factor 40, mscale = mscale_all_dim = 1, d_h + d_h^R = 128 + 64 = 192:
    # m = 0.1 ln 40 + 1 = 1.3688879454113936; scale = 192^-0.5 * m^2
    #   = 0.07216878364870322 * 1.8738542070926265 = 0.1352337788608801; amplitude = m / m = 1.
    cfg = _cfg(64, scaling=DEEPSEEK_V3_YARN, nope=128)
    assert yarn_mscale(40.0, 1.0) == pytest.approx(1.3688879454113936, rel=1e-14)
    assert softmax_scale(cfg) == pytest.approx(0.1352337788608801, rel=1e-14)
    assert rope_amplitude(cfg) == pytest.approx(1.0, rel=1e-14)
    assert softmax_scale(cfg) == pytest.approx(ref.softmax_scale_for(cfg), rel=1e-14)


def test_softmax_scale_and_amplitude_other_mscales_by_hand():
    # mscale_all_dim = 0: no softmax correction, amplitude m(40, 1) = 1.3688879454113936.
    cfg = _cfg(64, scaling=_yarn(40.0, mscale=1.0, mscale_all_dim=0.0), nope=128)
    assert softmax_scale(cfg) == pytest.approx(192**-0.5, rel=1e-14)
    assert rope_amplitude(cfg) == pytest.approx(1.3688879454113936, rel=1e-14)
    # mscale 0.707, mscale_all_dim 1, factor 4: amplitude (0.0707 ln 4 + 1) / (0.1 ln 4 + 1)
    #   = 1.0980110113 / 1.1386294361 = 0.9643269149; scale = 192^-0.5 * 1.1386294361^2.
    cfg = _cfg(64, scaling=_yarn(4.0, mscale=0.707, mscale_all_dim=1.0), nope=128)
    assert rope_amplitude(cfg) == pytest.approx(0.9643269149, rel=1e-9)
    assert softmax_scale(cfg) == pytest.approx(192**-0.5 * 1.1386294361**2, rel=1e-9)
    assert rope_amplitude(cfg) == pytest.approx(ref.amplitude_for(cfg), rel=1e-14)
    # without scaling: plain 1/sqrt(d) and amplitude 1
    cfg = _cfg(64, nope=128)
    assert softmax_scale(cfg) == pytest.approx(1 / math.sqrt(192), rel=1e-14)
    assert rope_amplitude(cfg) == 1.0


def _rope(cfg):
    return RotaryEmbedding.from_config(cfg)


@pytest.mark.parametrize("scaling", [None, _yarn(8.0, original=64, mscale=1.0, mscale_all_dim=0.5)])
def test_rotation_matches_reference(scaling):
    # fp32 vs float64, positions < 64: rtol 1e-5, atol 1e-5
    cfg = _cfg(16, scaling=scaling)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 16))
    pos = rng.integers(0, 64, (2, 5))
    got = np.asarray(_apply(_rope(cfg), jnp.asarray(x, jnp.float32), jnp.asarray(pos)))
    freqs, amp = ref.frequencies_for(cfg), ref.amplitude_for(cfg)
    want = np.array(
        [
            [[ref.rotate(x[b, t, h], pos[b, t], freqs, amp) for h in range(3)] for t in range(5)]
            for b in range(2)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a rank-3 input [B, T, d_R] (the shared rope key) rotates the same way
    got3 = np.asarray(_apply(_rope(cfg), jnp.asarray(x[:, :, 0], jnp.float32), jnp.asarray(pos)))
    np.testing.assert_allclose(got3, want[:, :, 0], rtol=1e-5, atol=1e-5)


def test_rotation_preserves_norm_and_scales_it_by_amplitude():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 7, 4, 32)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 1000, (2, 7)))
    norm = np.linalg.norm(np.asarray(x), axis=-1)
    rot = _rope(_cfg(32))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(_apply(rot, x, pos)), axis=-1), norm, rtol=1e-5)
    cfg = _cfg(32, scaling=_yarn(16.0, mscale=1.0, mscale_all_dim=0.0))
    amp = ref.amplitude_for(cfg)  # m(16, 1) = 1.277
    assert amp == pytest.approx(1 + 0.1 * math.log(16))
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(_apply(_rope(cfg), x, pos)), axis=-1), amp * norm, rtol=1e-5
    )


@pytest.mark.parametrize("scaling", [None, _yarn(40.0, mscale=1.0, mscale_all_dim=1.0)])
def test_dot_product_depends_only_on_position_difference(scaling):
    # q.k after RoPE at (m, n) equals the value at (m + s, n + s); fp32 angles up to ~200 rad:
    # atol 2e-4 on O(10) dot products
    cfg = _cfg(32, scaling=scaling)
    rot = _rope(cfg)
    rng = np.random.default_rng(2)
    q = rng.standard_normal(32)
    k = rng.standard_normal(32)
    pairs = [(5, 2), (17, 9), (40, 40), (3, 30)]
    shifts = [0, 1, 13, 150]
    xs = jnp.asarray(np.stack([q, k])[None, None], jnp.float32)  # [1, 1, 2, 32]

    def dot_at(m, n):
        rq = _apply(rot, xs, jnp.asarray([[m]]))[0, 0, 0]
        rk = _apply(rot, xs, jnp.asarray([[n]]))[0, 0, 1]
        return float(np.dot(np.asarray(rq, np.float64), np.asarray(rk, np.float64)))

    for m, n in pairs:
        values = [dot_at(m + s, n + s) for s in shifts]
        np.testing.assert_allclose(values, values[0], atol=2e-4)
        # and the value itself is the float64 one
        freqs, amp = ref.frequencies_for(cfg), ref.amplitude_for(cfg)
        want = np.dot(ref.rotate(q, m, freqs, amp), ref.rotate(k, n, freqs, amp))
        np.testing.assert_allclose(values[0], want, atol=2e-4)
    # and it does depend on the difference
    assert abs(dot_at(5, 2) - dot_at(5, 3)) > 1e-3


def test_positional_offset_equals_slice_of_longer_sequence():
    # decoding tokens at absolute positions [P, P + n) rotates exactly like the tail of the full
    # sequence: bitwise equal (same fp32 ops on the same inputs)
    cfg = _cfg(16, scaling=_yarn(4.0, original=32))
    rot = _rope(cfg)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 12, 2, 16)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    full = np.asarray(_apply(rot, x, pos))
    tail = np.asarray(_apply(rot, x[:, 9:], pos[:, 9:]))
    np.testing.assert_array_equal(tail, full[:, 9:])
    one = np.asarray(_apply(rot, x[:, 11:], jnp.full((2, 1), 11)))
    np.testing.assert_array_equal(one, full[:, 11:])


def test_rotation_keeps_input_dtype():
    rot = _rope(_cfg(8))
    x = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    assert _apply(rot, x, jnp.zeros((1, 3), jnp.int32)).dtype == jnp.bfloat16
    # position 0 is the identity (amplitude 1)
    np.testing.assert_array_equal(
        np.asarray(_apply(rot, x, jnp.zeros((1, 3), jnp.int32)), np.float32),
        np.ones((1, 3, 2, 8), np.float32),
    )
