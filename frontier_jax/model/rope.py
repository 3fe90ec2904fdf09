"""Rotary position embedding (RoPE) with YaRN context extension.

For a rotary head dimension d_R (even) and base theta, the frequencies are
    f_i = theta^(-2i / d_R),  i = 0 .. d_R/2 - 1.
YaRN (factor s, original context L0, beta_fast, beta_slow) blends interpolated frequencies
f_i / s and the original ones with a linear ramp over the dimension index:
    r(d) = d_R ln(L0 / (2 pi b)) / (2 ln theta)      (dimension completing b rotations in L0)
    lo = floor(r(beta_fast)), hi = ceil(r(beta_slow)), clipped to [0, d_R - 1]
    gamma_i = clip((i - lo) / (hi - lo), 0, 1)
    f_i' = (f_i / s) * gamma_i + f_i * (1 - gamma_i)
and a temperature correction m(s, mu) = 0.1 mu ln(s) + 1 (1 when s <= 1):
  * cos/sin are multiplied by m(s, mscale) / m(s, mscale_all_dim) (by m(s, 1) if either is 0);
  * the softmax scale is multiplied by m(s, mscale_all_dim)^2 (see `softmax_scale`).

Rotation uses the "half" layout: x = [x_a, x_b] with x_a, x_b of size d_R/2 and
    RoPE(x, p) = [x_a cos(p f) - x_b sin(p f),  x_b cos(p f) + x_a sin(p f)].
Checkpoints that store rotary dimensions as interleaved pairs (x0, x1), (x2, x3), ... are
permuted into this layout on import (`frontier_jax.convert`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.model.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """m(s, mu) = 0.1 mu ln(s) + 1 for s > 1, else 1."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair angular frequencies f' [d_R / 2] (float64), YaRN-blended when configured."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    rs = cfg.rope_scaling
    if rs.type != "yarn":
        return freqs

    def correction_dim(num_rotations: float) -> float:
        return (
            dim
            * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi))
            / (2 * math.log(base))
        )

    lo = max(math.floor(correction_dim(rs.beta_fast)), 0)
    hi = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if lo == hi:
        hi += 0.001
    gamma = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return freqs / rs.factor * gamma + freqs * (1.0 - gamma)


def rope_amplitude(cfg: ModelConfig) -> float:
    """The factor YaRN applies to cos/sin (1 without scaling)."""
    rs = cfg.rope_scaling
    if rs.type != "yarn":
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_mscale(rs.factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """Attention logit scale 1/sqrt(d_h + d_h^R), times m(s, mscale_all_dim)^2 under YaRN."""
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs.type == "yarn" and rs.mscale_all_dim:
        scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    return scale


@dataclass(frozen=True)
class RotaryEmbedding:
    """Applies RoPE at integer positions.  positions [B, T] (absolute, so a decode step passes
    its offset position) -> rotates x [B, T, ..., d_R] in fp32 and returns x's dtype."""

    freqs: tuple[float, ...]
    amplitude: float

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RotaryEmbedding":
        return cls(tuple(float(f) for f in rope_frequencies(cfg)), rope_amplitude(cfg))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        freqs = jnp.asarray(self.freqs, jnp.float32)
        angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, d_R/2]
        angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
        cos = jnp.cos(angles) * self.amplitude
        sin = jnp.sin(angles) * self.amplitude
        x32 = x.astype(jnp.float32)
        xa, xb = jnp.split(x32, 2, axis=-1)
        return jnp.concatenate([xa * cos - xb * sin, xb * cos + xa * sin], axis=-1).astype(x.dtype)
