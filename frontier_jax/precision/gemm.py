"""Scaled fp8 GEMMs with fp32 promotion per contraction block, all in "NT" form (both operands
contract on their last dim, as Hopper's fp8 tensor cores need).

With lhs = (ql, sl) [M, K], rhs = (qr, sr) [N, K] quantized per tile (`quantize.py`) and the
contraction split into blocks b of width B (B = 128 in DeepSeek-V3's recipe, B = K for one
scale per tensor), every GEMM here computes

    out[m, n] = sum_b  sl[m, b] sr[n, b] * ( sum_{k in block b} ql[m, k] qr[n, k] )

where the inner sum is an fp8 x fp8 dot accumulated in fp32 (in a fused kernel: the tensor
cores' limited-precision accumulation over one block) and the outer sum is the fp32
accumulator the scaled partial sums are promoted into every B elements of the contraction.

Two implementations with the same semantics: on GPUs with fp8 tensor cores (compute
capability >= 8.9) Pallas kernels -- on Hopper the dense blockwise GEMM and the grouped rows
GEMM (with e4m3 operands and weights scaled per 128 columns) are the warp-specialised Mosaic
GPU kernels of `kernels/fp8_gemm_mgpu.py`, the rest the Triton kernels of
`kernels/fp8_gemm.py` -- elsewhere (and as the reference) the XLA math below.  A dense GEMM with a single contraction block (per-tensor
scales) is one fp8 GEMM with a scaled epilogue, which XLA hands to cuBLAS; it stays on XLA.
Operands are zero-padded to the kernels' tiles where needed (exact); a contraction the
kernels cannot tile (blocks that are not multiples of 128) runs on XLA with one warning.
The grouped kernels assume the tile-aligned row layout (every group's row count a multiple
of 128): with other group sizes their results are NaN, never silently wrong.

qwix's `dot_general` / `ragged_dot` can compute dequantize-on-output products too, but pick
between a dequantize-first and a per-tile path by heuristics and do not cover the grouped
weight gradient (a contraction over each group's rows); the recipe fixes the accumulation, so
it is written out here.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import qwix

from frontier_jax.kernels import fp8_gemm, fp8_gemm_mgpu
from frontier_jax.kernels.fp8_scaling import expand_scale
from frontier_jax.kernels.grouped_gemm import TILE_ROWS, tile_groups


def use_kernel() -> bool:
    """Whether the fp8 GEMMs run as Pallas kernels: a GPU with fp8 tensor cores."""
    device = jax.devices()[0]
    return device.platform == "gpu" and float(getattr(device, "compute_capability", 0)) >= 8.9


@functools.cache
def _warn_fallback(where: str, reason: str) -> None:
    """Logged once per (layer, reason)."""
    logging.getLogger(__name__).warning(
        "fp8 GEMM of %s runs on the XLA path (slower): %s", where or "an unnamed caller", reason
    )


def _blocks(lhs: qwix.QArray, rhs: qwix.QArray) -> tuple[int, int]:
    """(number of contraction blocks, block width) of lhs [., K] (scale [., K / B]) and rhs
    [..., K] (scale [..., K / B])."""
    k, nb = lhs.shape[-1], lhs.scale.shape[-1]
    if nb != rhs.scale.shape[-1] or k != rhs.shape[-1]:
        raise ValueError(
            f"contractions differ: lhs {lhs.shape} (scale {lhs.scale.shape}), "
            f"rhs {rhs.shape} (scale {rhs.scale.shape})"
        )
    return nb, k // nb


def _kernel_contraction(lhs: qwix.QArray, rhs: qwix.QArray, where: str):
    """(lhs, rhs) with the contraction zero-padded to the kernels' 128-wide chunks where exact
    (a single block: one scale along K), or None (warned) when blocks are not whole chunks."""
    nb, bk = _blocks(lhs, rhs)
    if nb == 1:
        pad = lambda q: qwix.QArray(jnp.pad(q.qvalue, [(0, 0)] * (q.ndim - 1) + [(0, -bk % 128)]), q.scale)
        return pad(lhs), pad(rhs)
    if bk % 128 == 0:
        return lhs, rhs
    _warn_fallback(
        where,
        f"contraction blocks of {bk} (lhs {lhs.shape}, rhs {rhs.shape}) are "
        "not multiples of the kernel's 128-wide chunks",
    )
    return None


def _pad_rows(q: qwix.QArray, multiple: int) -> qwix.QArray | None:
    """q [..., R, K] with R zero-padded to a multiple of `multiple` (exact: zero values), its
    scale [..., R / t, K / B] extended by zero blocks; None if t does not divide the padding."""
    rows, scale_rows = q.shape[-2], q.scale.shape[-2]
    pad = -rows % multiple
    if not pad:
        return q
    widths = lambda n: [(0, 0)] * (q.ndim - 2) + [(0, n), (0, 0)]
    t = rows // scale_rows
    if scale_rows == 1:
        scale = q.scale
    elif pad % t == 0:
        scale = jnp.pad(q.scale, widths(pad // t))
    else:
        return None
    return qwix.QArray(jnp.pad(q.qvalue, widths(pad)), scale)


def _kernel_rows(operands, multiples, where: str):
    """The operands with rows padded to the kernel tiles, or None (warned) where impossible."""
    padded = [_pad_rows(q, m) for q, m in zip(operands, multiples)]
    if any(q is None for q in padded):
        _warn_fallback(
            where,
            "row blocks of the scales of "
            f"{[(q.shape, q.scale.shape) for q in operands]} cannot be padded "
            f"to the kernel tiles {multiples}",
        )
        return None
    return padded


def scaled_matmul(lhs: qwix.QArray, rhs: qwix.QArray, out_dtype=jnp.float32, where: str = "") -> jax.Array:
    """lhs [M, K] (scale [M or 1, K / B]) . rhs [N, K] (scale [N / t, K / B]) -> [M, N] in
    out_dtype (fp32 accumulation).  `where` names the caller in a fallback warning."""
    (m, _), n = lhs.shape, rhs.shape[0]
    if use_kernel() and _blocks(lhs, rhs)[0] > 1 and (ops := _kernel_contraction(lhs, rhs, where)):
        if fp8_gemm_mgpu.is_hopper() and lhs.qvalue.dtype == rhs.qvalue.dtype:
            if ops := _kernel_rows(ops, (128, 128), where):
                a, b = ops
                (mp, k), np_ = a.shape, b.shape[0]
                sa, sb = fp8_gemm_mgpu.chunk_scales(a.scale, b.scale, mp, np_, k)
                out = fp8_gemm_mgpu.fp8_matmul_nt_mgpu(a.qvalue, b.qvalue, sa, sb, out_dtype=out_dtype)
                return out[:m, :n]
        tiling = fp8_gemm.DEFAULT_TILING
        if ops := _kernel_rows(ops, (tiling.block_m, tiling.block_n), where):
            a, b = ops
            out = fp8_gemm.fp8_matmul_nt(
                a.qvalue, a.scale, b.qvalue, b.scale, out_dtype=out_dtype, tiling=tiling
            )
            return out[:m, :n]
    return _xla_scaled_matmul(lhs, rhs).astype(out_dtype)


def _xla_scaled_matmul(lhs: qwix.QArray, rhs: qwix.QArray) -> jax.Array:
    """XLA path of `scaled_matmul` -> fp32: the fp8 partial products [K / B, M, N] come from
    one batched dot, are scaled by the outer product of the block scales and summed in fp32."""
    (m, _), n = lhs.shape, rhs.shape[0]
    nb, bk = _blocks(lhs, rhs)
    partial = jnp.einsum(
        "mbk,nbk->bmn",
        lhs.qvalue.reshape(m, nb, bk),
        rhs.qvalue.reshape(n, nb, bk),
        preferred_element_type=jnp.float32,
    )
    sl = expand_scale(lhs.scale, (m, nb)).T[:, :, None]  # [nb, M, 1]
    sr = expand_scale(rhs.scale, (n, nb)).T[:, None, :]  # [nb, 1, N]
    return jnp.sum(partial * sl * sr, axis=0)


def row_groups(group_sizes: jax.Array, rows: int) -> jax.Array:
    """Group of each of `rows` rows sorted by group (group g owns n_g consecutive rows);
    rows past sum(group_sizes) get G."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right")


def flag_unaligned(out: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """out, or all NaN unless every group's row count is a multiple of TILE_ROWS (the layout
    the grouped kernels assume)."""
    return jnp.where(jnp.all(group_sizes % TILE_ROWS == 0), out, jnp.nan).astype(out.dtype)


def scaled_grouped_matmul(
    lhs: qwix.QArray, rhs: qwix.QArray, group_sizes: jax.Array, out_dtype=jnp.float32, where: str = ""
) -> jax.Array:
    """out[r] = lhs[r] . rhs[g(r)] for rows sorted by group (forward and dgrad of the experts).

    lhs [M, K] (scale [M or 1, K / B]), rhs [G, N, K] (scale [G, N / t, K / B]),
    group_sizes [G] -> [M, N] in out_dtype; rows past sum(group_sizes) are zero.  The kernel
    path needs group sizes that are multiples of TILE_ROWS (NaN otherwise)."""
    (m, _), n = lhs.shape, rhs.shape[1]
    if use_kernel() and (ops := _kernel_contraction(lhs, rhs, where)):
        block_cols = (n // rhs.scale.shape[1]) % 128 == 0  # W's scale constant over 128 columns
        if fp8_gemm_mgpu.is_hopper() and lhs.qvalue.dtype == rhs.qvalue.dtype and block_cols:
            if ops := _kernel_rows(ops, (TILE_ROWS, 128), where):
                a, w = ops
                (mp, k), np_ = a.shape, w.shape[1]
                sa, sw = fp8_gemm_mgpu.chunk_scales(a.scale, w.scale, mp, np_, k)
                tile_group, _ = tile_groups(group_sizes, mp // TILE_ROWS)
                out = fp8_gemm_mgpu.fp8_grouped_rows_nt_mgpu(
                    a.qvalue, w.qvalue, sa, sw, tile_group, out_dtype=out_dtype
                )
                return flag_unaligned(out[:m, :n], group_sizes)
        tiling = fp8_gemm.DEFAULT_TILING
        if ops := _kernel_rows(ops, (TILE_ROWS, tiling.block_n), where):
            a, w = ops
            tile_group, _ = tile_groups(group_sizes, a.shape[0] // TILE_ROWS)
            out = fp8_gemm.fp8_grouped_rows_nt(
                a.qvalue, a.scale, w.qvalue, w.scale, tile_group, out_dtype=out_dtype, tiling=tiling
            )
            return flag_unaligned(out[:m, :n], group_sizes)
    return _xla_scaled_grouped_matmul(lhs, rhs, group_sizes).astype(out_dtype)


def _xla_scaled_grouped_matmul(lhs: qwix.QArray, rhs: qwix.QArray, group_sizes: jax.Array) -> jax.Array:
    """XLA path of `scaled_grouped_matmul` -> fp32, for any group sizes: a scan over the K
    blocks adds each block's scaled fp8 `ragged_dot` into the fp32 accumulator (one
    `ragged_dot_general` batched over the blocks would do, but XLA:GPU rejects batch
    dimensions in ragged dots as of jax 0.11)."""
    (m, _), (g, n, _) = lhs.shape, rhs.shape
    nb, bk = _blocks(lhs, rhs)
    group = row_groups(group_sizes, m)
    blocks = (
        lhs.qvalue.reshape(m, nb, bk).transpose(1, 0, 2),  # [nb, M, B]
        rhs.qvalue.reshape(g, n, nb, bk).transpose(2, 0, 3, 1),  # [nb, G, B, N]
        expand_scale(lhs.scale, (m, nb)).T,  # [nb, M]
        rhs.scale[jnp.minimum(group, g - 1)].transpose(2, 0, 1),
    )  # [nb, M, N / t]

    def add_block(acc, block):
        ql, qr, sl, sr = block
        partial = jax.lax.ragged_dot(ql, qr, group_sizes, preferred_element_type=jnp.float32)
        return acc + partial * sl[:, None] * expand_scale(sr, (m, n)), None

    out, _ = jax.lax.scan(add_block, jnp.zeros((m, n), jnp.float32), blocks)
    return jnp.where((group < g)[:, None], out, 0.0)


def scaled_grouped_matmul_tn(
    lhs: qwix.QArray,
    rhs: qwix.QArray,
    tile_groups: jax.Array,
    num_groups: int,
    out_dtype=jnp.float32,
    where: str = "",
) -> jax.Array:
    """out[g] = sum over g's row tiles t of lhs_t . rhs_t^T (the experts' weight gradient).

    lhs = x^T [K, P] (scale [K or 1, P / B or 1]), rhs = dy^T [N, P] (scale [N or 1,
    P / B or 1]); the P rows form T = len(tile_groups) tiles of B = P / T rows, tile t
    belonging wholly to group tile_groups[t] (non-decreasing; G or more: dropped).  Per tile
    the fp8 partial [K, N] is scaled by the outer product of the two tiles' scales; tiles are
    then summed per group -> [G, K, N] in out_dtype."""
    (k, p), n, t = lhs.shape, rhs.shape[0], tile_groups.shape[0]
    if use_kernel() and p == t * TILE_ROWS:
        tiling = fp8_gemm.DEFAULT_TILING
        if ops := _kernel_rows((lhs, rhs), (tiling.block_m, tiling.block_n), where):
            a, b = ops
            tile_start = jnp.searchsorted(tile_groups, jnp.arange(num_groups + 1), side="left")
            out = fp8_gemm.fp8_grouped_weight_grad_nt(
                a.qvalue, a.scale, b.qvalue, b.scale, tile_start, out_dtype=out_dtype, tiling=tiling
            )
            return out[:, :k, :n]
    elif use_kernel():
        _warn_fallback(where, f"weight-gradient row tiles of {p // t} rows, not {TILE_ROWS}")
    return _xla_scaled_grouped_matmul_tn(lhs, rhs, tile_groups, num_groups).astype(out_dtype)


def _xla_scaled_grouped_matmul_tn(
    lhs: qwix.QArray, rhs: qwix.QArray, tile_groups: jax.Array, num_groups: int
) -> jax.Array:
    """XLA path of `scaled_grouped_matmul_tn` -> fp32 (tile_groups in any order)."""
    (k, p), n, t = lhs.shape, rhs.shape[0], tile_groups.shape[0]
    partial = jnp.einsum(
        "ktp,ntp->tkn",
        lhs.qvalue.reshape(k, t, p // t),
        rhs.qvalue.reshape(n, t, p // t),
        preferred_element_type=jnp.float32,
    )
    sl = expand_scale(lhs.scale, (k, t)).T[:, :, None]
    sr = expand_scale(rhs.scale, (n, t)).T[:, None, :]
    return jax.ops.segment_sum(partial * sl * sr, tile_groups, num_segments=num_groups)
