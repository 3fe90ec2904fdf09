"""The fp8 scale arithmetic shared by the Pallas kernels and `precision.quantize` (XLA), so
both give the same bits (fp_max = 448 for e4m3, 57344 for e5m2; all in fp32):

    s = amax(|T|) * fp32(1 / fp_max)   per tile T (1 when below the smallest normal fp32)
    q = fp8(clip(x * fp32(1 / s), -fp_max, fp_max))
Explicit reciprocals, not divisions: XLA rewrites a division into a multiplication by a
reciprocal or not depending on fusion, which moves s or x / s by 1 ulp.

A tile holding a NaN or inf gets amax = NaN, hence s = NaN and NaN products for every output
the tile feeds, on every backend.  A max reduction alone does not give that portably: XLA:GPU's
max propagates NaN, but Triton's max ignores it and XLA:CPU's vectorised reduce_max drops it
(any reduction of 64+ rows of 128; openxla/xla#21461), so `abs_max` carries the NaN by a sum.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_TINY = float(jnp.finfo(jnp.float32).tiny)


def abs_max(x: jax.Array, axis) -> jax.Array:
    """max |x| over axis (an int or a tuple, kept as size-1 dims), NaN where those elements
    hold a NaN or inf: max |x| + sum(x * 0), the sum being 0 for finite x and NaN otherwise."""
    return jnp.max(jnp.abs(x), axis=axis, keepdims=True) + jnp.sum(x * 0.0, axis=axis, keepdims=True)


def scale_from_amax(amax: jax.Array, qtype) -> jax.Array:
    """s = amax * fp32(1 / fp_max), or 1 where that is below the smallest normal fp32."""
    scale = amax * np.float32(1.0 / float(jnp.finfo(qtype).max))
    return jnp.where(scale < _TINY, 1.0, scale)


def to_fp8(x: jax.Array, inverse: jax.Array, qtype) -> jax.Array:
    """q = fp8(clip(x * inverse, -fp_max, fp_max)) for fp32 x and inverse = 1 / s (broadcast)."""
    fp_max = float(jnp.finfo(qtype).max)
    return jnp.clip(x * inverse, -fp_max, fp_max).astype(qtype)


def expand_scale(scale: jax.Array, shape: Sequence[int]) -> jax.Array:
    """A per-tile scale [d_i / t_i] repeated to `shape` [d_i] (each d_i a multiple of the
    scale's extent on that axis)."""
    for axis, (s, d) in enumerate(zip(scale.shape, shape)):
        if s != d:
            scale = jnp.repeat(scale, d // s, axis=axis, total_repeat_length=d)
    return scale
