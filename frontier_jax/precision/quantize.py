"""Tile-wise current-scaling quantization to fp8, into `qwix.QArray`s, and shape helpers.

For a tile T of x (all arithmetic in fp32, fp_max = 448 for e4m3, 57344 for e5m2):
    s = amax(|T|) * fp32(1 / fp_max)      (~ amax / fp_max; 1 when below the smallest normal
                                           fp32, so an all-zero tile never divides by zero)
    q = fp8(clip(x * fp32(1 / s), -fp_max, fp_max))       x ~ q s
A NaN or inf inside a tile makes its s NaN or inf, hence q s NaN, so it reaches every output the
tile contributes to instead of being hidden.

The result is a `qwix.QArray` (qvalue, scale with one entry per tile), qwix's representation of
tiled-scale quantized arrays: its transpose/reshape move qvalue and scale together and
`qwix.dequantize` inverts it.  The scale arithmetic is written here rather than taken from
`qwix.quantize`, which divides (amax / fp_max, x / s): XLA rewrites such divisions into
multiplications by a reciprocal or not depending on fusion, which moves s or x / s by 1 ulp
and can flip an fp8 rounding tie.  Explicit reciprocals give bit-reproducible values.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix

_TINY = float(jnp.finfo(jnp.float32).tiny)


def tile_amax(x: jax.Array, tiles: Sequence[int | None]) -> jax.Array:
    """max |x| per tile: x [d_i] -> [1 if t_i is None else d_i / t_i] (t_i = 1: per index)."""
    split, reduce = [], []
    for axis, (d, t) in enumerate(zip(x.shape, tiles)):
        t = d if t is None else t
        if d % t:
            raise ValueError(f"axis {axis} of {x.shape} is not a multiple of its tile {t} "
                             f"(tiles {tuple(tiles)}): pad it first (pad_to_multiple)")
        split += [d // t, t]
        reduce.append(2 * axis + 1)
    return jnp.max(jnp.abs(x).reshape(split), axis=tuple(reduce))


def quantize(x: jax.Array, qtype, tiles: Sequence[int | None]) -> qwix.QArray:
    """x [d_0, ..., d_r] -> QArray: qvalue of x's shape in `qtype` and an fp32 scale of shape
    [1 if t_i is None else d_i / t_i]: tiles[i] None = one scale over axis i, 1 = a scale per
    index, t > 1 = tiles of t (d_i a multiple of t: see `pad_to_multiple`)."""
    if len(tiles) != x.ndim:
        raise ValueError(f"tiles {tuple(tiles)} do not match an operand of shape {x.shape}")
    x = x.astype(jnp.float32)
    scale = scale_from_amax(tile_amax(x, tiles), qtype)
    return qwix.QArray(to_fp8(x, expand_scale(1.0 / scale, x.shape), qtype), scale)


def scale_from_amax(amax: jax.Array, qtype) -> jax.Array:
    """s = amax * fp32(1 / fp_max), or 1 where that is below the smallest normal fp32."""
    scale = amax * np.float32(1.0 / float(jnp.finfo(qtype).max))
    return jnp.where(scale < _TINY, 1.0, scale)


def to_fp8(x: jax.Array, inverse: jax.Array, qtype) -> jax.Array:
    """q = fp8(clip(x * inverse, -fp_max, fp_max)) for fp32 x and inverse = 1 / s (broadcast)."""
    fp_max = float(jnp.finfo(qtype).max)
    return jnp.clip(x * inverse, -fp_max, fp_max).astype(qtype)


def pad_to_multiple(x: jax.Array, multiples: Sequence[int]) -> jax.Array:
    """Zero-pads the end of every axis i up to a multiple of multiples[i]."""
    pads = [(0, -d % m) for d, m in zip(x.shape, multiples)]
    return jnp.pad(x, pads) if any(hi for _, hi in pads) else x


def expand_scale(scale: jax.Array, shape: Sequence[int]) -> jax.Array:
    """A per-tile scale [d_i / t_i] repeated to `shape` [d_i] (each d_i a multiple of the
    scale's extent on that axis)."""
    for axis, (s, d) in enumerate(zip(scale.shape, shape)):
        if s != d:
            scale = jnp.repeat(scale, d // s, axis=axis, total_repeat_length=d)
    return scale
