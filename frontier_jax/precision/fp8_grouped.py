"""fp8 grouped (routed-expert) matmul out[r] = x[r] W[g(r)] with all three GEMMs in fp8.

Rows of x [M, K] are sorted by group, group g owning n_g = group_sizes[g] consecutive rows
(rows past sum(n) give zeros); W [G, K, N].  Each expert's W_g is quantized on its own
(recipe.weight_tiles per group: 128 x 128 blocks for fp8_deepseek, one scale per expert for
fp8_tensor).
    forward  y_g  = x_g W_g      x: row_tiles (1 x 128 along K; rows need no padding)
    dgrad    dx_g = dy_g W_g^T   dy: row_tiles
    wgrad    dW_g = x_g^T dy_g   contraction over group g's rows: x and dy are re-tiled
                                 128 x 1 along rows, with every group's rows zero-padded to
                                 a multiple of 128 so that no tile spans two groups
K and N are zero-padded to the recipe's block like the dense case (`fp8_linear`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from frontier_jax.precision.gemm import row_groups, scaled_grouped_matmul, scaled_grouped_matmul_tn
from frontier_jax.precision.quantize import pad_to_multiple, quantize
from frontier_jax.precision.recipe import E4M3, ROW_ALIGN, Fp8Recipe


def fp8_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                       recipe: Fp8Recipe) -> jax.Array:
    """x [M, K], w [G, K, N], group_sizes [G] -> [M, N] in x's dtype."""
    return _grouped(x, w.astype(x.dtype), group_sizes.astype(jnp.int32), recipe)


def group_aligned_rows(group_sizes: jax.Array, rows: int, align: int) -> tuple[jax.Array, jax.Array]:
    """Layout with every group's rows starting at a multiple of `align`.

    Returns (dest [rows]: padded position of each row, P = the overflow slot for rows past
    sum(group_sizes); tile_group [P / align]: group of each tile of `align` rows, G for unused
    tiles), with P = the static bound ceil((rows + G (align - 1)) / align) align."""
    g = group_sizes.shape[0]
    padded = -(-group_sizes // align) * align
    p = -(-(rows + g * (align - 1)) // align) * align
    group = row_groups(group_sizes, rows)
    safe = jnp.minimum(group, g - 1)
    start, padded_start = jnp.cumsum(group_sizes) - group_sizes, jnp.cumsum(padded) - padded
    dest = jnp.where(group < g, padded_start[safe] + jnp.arange(rows) - start[safe], p)
    tile_group = row_groups(padded // align, p // align)
    return dest, tile_group


def _to_aligned(rows: jax.Array, dest: jax.Array, tiles: int, align: int) -> jax.Array:
    """rows [M, C] -> [tiles * align, C] with row i at dest[i] (overflow dropped), zeros elsewhere."""
    buf = jnp.zeros((tiles * align + 1, rows.shape[1]), rows.dtype)
    return buf.at[dest].set(rows)[:-1]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(x, w, group_sizes, recipe):
    return _forward(x, w, group_sizes, recipe)[0]


def _forward(x, w, group_sizes, recipe: Fp8Recipe):
    b, n = recipe.multiple, w.shape[2]
    wq = quantize(pad_to_multiple(w, (1, b, b)), E4M3, (1, *recipe.weight_tiles))
    xq = quantize(pad_to_multiple(x, (1, b)), E4M3, recipe.row_tiles)
    y = scaled_grouped_matmul(xq, wq, group_sizes)[:, :n]
    return y.astype(x.dtype), (x, wq, group_sizes)


def _backward(recipe: Fp8Recipe, residuals, dy):
    x, wq, group_sizes = residuals
    (m, k), n, b, g = x.shape, dy.shape[1], recipe.multiple, group_sizes.shape[0]
    dy_rows = quantize(pad_to_multiple(dy, (1, b)), recipe.grad_dtype, recipe.row_tiles)
    dx = scaled_grouped_matmul(dy_rows, wq.transpose(0, 2, 1), group_sizes)[:, :k]

    # Per-tensor scales (block None) need no alignment for their scales, only for the per-tile
    # group sums; the fp8_deepseek tiles are ROW_ALIGN = 128 = its block.
    align = recipe.block or ROW_ALIGN
    dest, tile_group = group_aligned_rows(group_sizes, m, align)
    tiles = tile_group.shape[0]
    x_cols = quantize(pad_to_multiple(_to_aligned(x, dest, tiles, align), (1, b)), E4M3,
                      recipe.col_tiles)
    dy_cols = quantize(pad_to_multiple(_to_aligned(dy, dest, tiles, align), (1, b)),
                       recipe.grad_dtype, recipe.col_tiles)
    dw = scaled_grouped_matmul_tn(x_cols, dy_cols, tile_group, g)[:, :k, :n]
    return dx.astype(x.dtype), dw.astype(x.dtype), None


_grouped.defvjp(_forward, _backward)
