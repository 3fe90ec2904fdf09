"""Tile-wise current-scaling quantization to fp8, into `qwix.QArray`s, and shape helpers.

For a tile T of x (all arithmetic in fp32, fp_max = 448 for e4m3, 57344 for e5m2):
    s = amax(|T|) * fp32(1 / fp_max)      (~ amax / fp_max; 1 when below the smallest normal
                                           fp32, so an all-zero tile never divides by zero)
    q = fp8(clip(x * fp32(1 / s), -fp_max, fp_max))       x ~ q s
A NaN or inf inside a tile makes its s NaN (`fp8_scaling.abs_max`: on every backend, XLA:CPU's
max reduction dropping NaN included), hence q s NaN, so it reaches every output the tile
contributes to instead of being hidden.

The result is a `qwix.QArray` (qvalue, scale with one entry per tile), qwix's representation of
tiled-scale quantized arrays: its transpose/reshape move qvalue and scale together and
`qwix.dequantize` inverts it.  The scale arithmetic is written here rather than taken from
`qwix.quantize`, which divides (amax / fp_max, x / s): XLA rewrites such divisions into
multiplications by a reciprocal or not depending on fusion, which moves s or x / s by 1 ulp
and can flip an fp8 rounding tie.  Explicit reciprocals give bit-reproducible values
(`kernels.fp8_scaling`, shared with the Pallas kernels).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import qwix

from frontier_jax.kernels.fp8_scaling import abs_max, expand_scale, scale_from_amax, to_fp8


def tile_amax(x: jax.Array, tiles: Sequence[int | None]) -> jax.Array:
    """max |x| per tile (NaN for a tile holding NaN or inf): x [d_i] -> [1 if t_i is None else
    d_i / t_i] (t_i = 1: per index)."""
    split, reduce = [], []
    for axis, (d, t) in enumerate(zip(x.shape, tiles)):
        t = d if t is None else t
        if d % t:
            raise ValueError(
                f"axis {axis} of {x.shape} is not a multiple of its tile {t} "
                f"(tiles {tuple(tiles)}): pad it first (pad_to_multiple)"
            )
        split += [d // t, t]
        reduce.append(2 * axis + 1)
    return abs_max(x.reshape(split), tuple(reduce)).reshape(split[::2])


def quantize(x: jax.Array, qtype, tiles: Sequence[int | None]) -> qwix.QArray:
    """x [d_0, ..., d_r] -> QArray: qvalue of x's shape in `qtype` and an fp32 scale of shape
    [1 if t_i is None else d_i / t_i]: tiles[i] None = one scale over axis i, 1 = a scale per
    index, t > 1 = tiles of t (d_i a multiple of t: see `pad_to_multiple`)."""
    if len(tiles) != x.ndim:
        raise ValueError(f"tiles {tuple(tiles)} do not match an operand of shape {x.shape}")
    x = x.astype(jnp.float32)
    scale = scale_from_amax(tile_amax(x, tiles), qtype)
    return qwix.QArray(to_fp8(x, expand_scale(1.0 / scale, x.shape), qtype), scale)


def pad_to_multiple(x: jax.Array, multiples: Sequence[int]) -> jax.Array:
    """Zero-pads the end of every axis i up to a multiple of multiples[i]."""
    pads = [(0, -d % m) for d, m in zip(x.shape, multiples)]
    return jnp.pad(x, pads) if any(hi for _, hi in pads) else x
