"""Scaled fp8 GEMMs with fp32 promotion per contraction block: the XLA reference semantics.

With lhs = (ql, sl), rhs = (qr, sr) quantized per tile (`quantize.py`) and the contraction
split into blocks b of width B (B = 128 in DeepSeek-V3's recipe, B = K for one scale per
tensor), every GEMM here computes

    out[m, n] = sum_b  sl[m, b] sr[b, n] * ( sum_{k in block b} ql[m, k] qr[k, n] )

where the inner sum is an fp8 x fp8 dot accumulated in fp32 (in a fused kernel: the tensor
cores' limited-precision accumulation over one block) and the outer sum is the fp32
accumulator the scaled partial sums are promoted into every B elements of the contraction.

qwix's `dot_general` / `ragged_dot` can compute dequantize-on-output products too, but pick
between a dequantize-first and a per-tile path by heuristics and do not cover the grouped
weight gradient (a contraction over each group's rows); the recipe fixes the accumulation, so
it is written out here.  `scaled_matmul` is the one function a GPU fp8 kernel replaces for the
projections (dense layers); the grouped pair below is the seam for a grouped fp8 kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix

from frontier_jax.precision.quantize import expand_scale


def _blocks(lhs: qwix.QArray, rhs_blocks: int) -> tuple[int, int]:
    """(number of contraction blocks, block width) from lhs [M, K] with scale [., K / B]."""
    k, nb = lhs.shape[-1], lhs.scale.shape[-1]
    if nb != rhs_blocks:
        raise ValueError(f"contraction blocks differ: lhs scale {lhs.scale.shape}, rhs {rhs_blocks}")
    return nb, k // nb


def scaled_matmul(lhs: qwix.QArray, rhs: qwix.QArray) -> jax.Array:
    """lhs [M, K] (scale [M or 1, K / B]) x rhs [K, N] (scale [K / B, N / t]) -> fp32 [M, N].

    XLA path: the fp8 partial products [K / B, M, N] come from one batched dot, are scaled by
    the outer product of the block scales and summed in fp32.  A fused kernel keeps the
    accumulator in registers instead of materialising the partials."""
    (m, _), n = lhs.shape, rhs.shape[1]
    nb, bk = _blocks(lhs, rhs.scale.shape[0])
    partial = jnp.einsum("mbk,bkn->bmn", lhs.qvalue.reshape(m, nb, bk),
                         rhs.qvalue.reshape(nb, bk, n), preferred_element_type=jnp.float32)
    sl = expand_scale(lhs.scale, (m, nb)).T[:, :, None]  # [nb, M, 1]
    sr = expand_scale(rhs.scale, (nb, n))[:, None, :]  # [nb, 1, N]
    return jnp.sum(partial * sl * sr, axis=0)


def row_groups(group_sizes: jax.Array, rows: int) -> jax.Array:
    """Group of each of `rows` rows sorted by group (group g owns n_g consecutive rows);
    rows past sum(group_sizes) get G."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right")


def scaled_grouped_matmul(lhs: qwix.QArray, rhs: qwix.QArray, group_sizes: jax.Array) -> jax.Array:
    """out[r] = lhs[r] rhs[g(r)] for rows sorted by group (forward and dgrad of the experts).

    lhs [M, K] (scale [M or 1, K / B]), rhs [G, K, N] (scale [G, K / B, N / t]),
    group_sizes [G] -> fp32 [M, N]; rows past sum(group_sizes) are zero.  A scan over the K
    blocks adds each block's scaled fp8 `ragged_dot` into the fp32 accumulator (one
    `ragged_dot_general` batched over the blocks would do, but XLA:GPU rejects batch dimensions
    in ragged dots as of jax 0.11)."""
    (m, _), (g, _, n) = lhs.shape, rhs.shape
    nb, bk = _blocks(lhs, rhs.scale.shape[1])
    group = row_groups(group_sizes, m)
    blocks = (lhs.qvalue.reshape(m, nb, bk).transpose(1, 0, 2),  # [nb, M, B]
              rhs.qvalue.reshape(g, nb, bk, n).transpose(1, 0, 2, 3),  # [nb, G, B, N]
              expand_scale(lhs.scale, (m, nb)).T,  # [nb, M]
              rhs.scale[jnp.minimum(group, g - 1)].transpose(1, 0, 2))  # [nb, M, N / t]

    def add_block(acc, block):
        ql, qr, sl, sr = block
        partial = jax.lax.ragged_dot(ql, qr, group_sizes, preferred_element_type=jnp.float32)
        return acc + partial * sl[:, None] * expand_scale(sr, (m, n)), None

    out, _ = jax.lax.scan(add_block, jnp.zeros((m, n), jnp.float32), blocks)
    return jnp.where((group < g)[:, None], out, 0.0)


def scaled_grouped_matmul_tn(lhs: qwix.QArray, rhs: qwix.QArray, tile_groups: jax.Array,
                             num_groups: int) -> jax.Array:
    """out[g] = lhs_g^T rhs_g (the experts' weight gradient), contracting rows tile by tile.

    lhs [P, K] (scale [P / B or 1, K or 1]), rhs [P, N] (scale [P / B or 1, N or 1]); the P rows
    form T = len(tile_groups) tiles of B = P / T rows, tile t belonging wholly to group
    tile_groups[t] (G or more: dropped).  Per tile the fp8 partial [K, N] is scaled by the
    outer product of the two tiles' scales; tiles are then summed per group -> fp32 [G, K, N]."""
    (p, k), n, t = lhs.shape, rhs.shape[1], tile_groups.shape[0]
    partial = jnp.einsum("tpk,tpn->tkn", lhs.qvalue.reshape(t, p // t, k),
                         rhs.qvalue.reshape(t, p // t, n), preferred_element_type=jnp.float32)
    sl = expand_scale(lhs.scale, (t, k))[:, :, None]
    sr = expand_scale(rhs.scale, (t, n))[:, None, :]
    return jax.ops.segment_sum(partial * sl * sr, tile_groups, num_segments=num_groups)
