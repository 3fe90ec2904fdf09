"""Independent numpy reference of the fp8 recipes (float64 products, ml_dtypes fp8 rounding).

Quantization of a tile T (scale arithmetic in fp32 with explicit reciprocals, as defined in
frontier_jax/precision/quantize.py):
    s = fp32(amax|T|) * fp32(1 / fp_max), 1 if below the smallest normal fp32
    q = fp8(clip(x * fp32(1 / s), +-fp_max))          (ml_dtypes: round to nearest even)
Tiles are given per axis (None: whole axis, 1: per index, t: runs of t, the last one partial,
so unpadded data can be quantized directly).  Since a contraction block's scales are constant
along the block, the blockwise sum  sum_b sl sr (ql qr)_b  equals the float64 product of the
dequantized operands (ql sl) @ (qr sr), which is what the references below compute.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np

FORMATS = {"e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "e5m2": (ml_dtypes.float8_e5m2, 57344.0)}
TINY = np.finfo(np.float32).tiny


def _slices(dim: int, tile):
    if tile is None:
        return [slice(0, dim)]
    return [slice(i, min(i + tile, dim)) for i in range(0, dim, tile)]


def quantize(x, tiles, fmt: str = "e4m3"):
    """x (any float array) -> (q as float64, per-element scale as float64), both x's shape."""
    x = np.asarray(x, np.float32)
    dtype, fmax = FORMATS[fmt]
    q, s = np.empty(x.shape), np.empty(x.shape)
    for index in itertools.product(*(_slices(d, t) for d, t in zip(x.shape, tiles))):
        tile = x[index]
        if not tile.size:
            continue
        with np.errstate(invalid="ignore"):
            scale = np.float32(np.max(np.abs(tile))) * np.float32(1.0 / fmax)
            scale = np.float32(1.0) if scale < TINY else scale
            q[index] = np.clip(tile * (np.float32(1.0) / scale), -fmax, fmax).astype(dtype)
        s[index] = scale
    return q, s


def dequantize(x, tiles, fmt: str = "e4m3"):
    q, s = quantize(x, tiles, fmt)
    return q * s


def recipe_tiles(block):
    """(row_tiles, col_tiles, weight_tiles) of a recipe with this block (None: per tensor)."""
    if block is None:
        return (None, None), (None, None), (None, None)
    return (1, block), (block, 1), (block, block)


def linear(x, w, dy, block, grad_fmt):
    """float64 (y, dx, dW) of the fp8 recipe for y = x w: x [M, K], w [K, N], dy [M, N]."""
    row, col, blk = recipe_tiles(block)
    wd = dequantize(w, blk)
    y = dequantize(x, row) @ wd
    dx = dequantize(dy, row, grad_fmt) @ wd.T
    dw = dequantize(x, col).T @ dequantize(dy, col, grad_fmt)
    return y, dx, dw


def grouped(x, w, dy, group_sizes, block, grad_fmt):
    """float64 (y, dx, dW) of the grouped recipe as a loop over groups: x [M, K] rows sorted by
    group, w [G, K, N] (each expert quantized on its own), dy [M, N].  Per-tensor scales of x
    and dy span all rows; 128 x 1 wgrad tiles start at each group's first row."""
    row, col, blk = recipe_tiles(block)
    xr, dyr = dequantize(x, row), dequantize(dy, row, grad_fmt)
    y, dx, dw = np.zeros(dy.shape), np.zeros(x.shape), np.zeros(w.shape)
    start = 0
    for g, n in enumerate(group_sizes):
        rows = slice(start, start + n)
        wd = dequantize(w[g], blk)
        y[rows], dx[rows] = xr[rows] @ wd, dyr[rows] @ wd.T
        if block is None:  # one scale for all rows of x and of dy
            dw[g] = dequantize(x, col)[rows].T @ dequantize(dy, col, grad_fmt)[rows]
        else:
            dw[g] = dequantize(x[rows], col).T @ dequantize(dy[rows], col, grad_fmt)
        start += n
    return y, dx, dw
