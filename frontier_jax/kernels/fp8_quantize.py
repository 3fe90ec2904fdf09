"""Fused fp8 quantization of an activation along both axes in one pass (Pallas; Triton on
GPUs, the interpreter elsewhere).

For x [M, K] (M, K multiples of B = 128) one program reads one [B, B] tile of x once and
writes, as asked,
    rows:  q [M, K]  with s [M, K / B]   (1 x B tiles: the lhs of y = x W, dx = dy W^T)
    cols:  q^T [K, M] with s^T [K, M / B] (B x 1 tiles along M, stored transposed: the NT
                                           operands x^T, dy^T of the weight gradient)
each tile's scale s = amax(|tile|) / fp_max and q = fp8(x / s) with exactly the arithmetic of
`precision.quantize.quantize` (shared helpers, `fp8_scaling`), so both paths give the same bits for finite x;
a tile holding NaN or inf gets a NaN scale (its products come out NaN).  XLA does
the same work as separate reduce and transpose fusions that read x up to four times.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import qwix
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from frontier_jax.kernels.fp8_scaling import abs_max, scale_from_amax, to_fp8
from frontier_jax.kernels.lowering import interpret

BLOCK = 128
NUM_WARPS = 4  # per [B, B] tile (benchmarks/fp8_quantize.py sweeps it)


def _kernel(x_ref, *out_refs, qtype, rows: bool, cols: bool):
    x = x_ref[...].astype(jnp.float32)  # [B, B]
    outs = iter(out_refs)
    if rows:
        q_ref, s_ref = next(outs), next(outs)
        scale = scale_from_amax(abs_max(x, 1), qtype)  # [B, 1]
        q_ref[...] = to_fp8(x, 1.0 / scale, qtype)
        s_ref[...] = scale
    if cols:
        qt_ref, st_ref = next(outs), next(outs)
        scale = scale_from_amax(abs_max(x, 0), qtype)  # [1, B]
        qt_ref[...] = to_fp8(x.T, 1.0 / scale.T, qtype)
        st_ref[...] = scale.T


def quantize_rows_cols(
    x: jax.Array, qtype, *, rows: bool = True, cols: bool = True, num_warps: int = NUM_WARPS
) -> tuple[qwix.QArray | None, qwix.QArray | None]:
    """x [M, K] -> (quantize(x, qtype, (1, 128)) if rows, quantize(x, qtype, (128, 1)).T if
    cols), None for the one not asked for."""
    m, k = x.shape
    if m % BLOCK or k % BLOCK or not (rows or cols):
        raise ValueError(
            f"fused fp8 quantization: x {x.shape} must be [M, K] with M, K "
            f"multiples of {BLOCK} (pad it: quantize.pad_to_multiple), rows={rows}, "
            f"cols={cols} (one at least)"
        )
    grid = (m // BLOCK, k // BLOCK)
    tile = pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (i, j))
    out_shape, out_specs = [], []
    if rows:
        out_shape += [jax.ShapeDtypeStruct((m, k), qtype), jax.ShapeDtypeStruct((m, k // BLOCK), jnp.float32)]
        out_specs += [tile, pl.BlockSpec((BLOCK, 1), lambda i, j: (i, j))]
    if cols:
        out_shape += [jax.ShapeDtypeStruct((k, m), qtype), jax.ShapeDtypeStruct((k, m // BLOCK), jnp.float32)]
        out_specs += [
            pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (j, i)),
            pl.BlockSpec((BLOCK, 1), lambda i, j: (j, i)),
        ]
    outs = iter(
        pl.pallas_call(
            functools.partial(_kernel, qtype=qtype, rows=rows, cols=cols),
            out_shape=out_shape,
            grid=grid,
            in_specs=[tile],
            out_specs=out_specs,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
            interpret=interpret(),
            name="fp8_quantize_rows_cols",
        )(x)
    )
    return (
        qwix.QArray(next(outs), next(outs)) if rows else None,
        qwix.QArray(next(outs), next(outs)) if cols else None,
    )
