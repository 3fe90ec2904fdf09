"""fp8 grouped (routed-expert) matmul out[r] = x[r] W[g(r)] with all three GEMMs in fp8.

Rows of x [M, K] are sorted by group, group g owning n_g = group_sizes[g] consecutive rows
(rows past sum(n) give zeros); W [G, K, N].  Each expert's W_g is quantized on its own
(recipe.weight_tiles per group: 128 x 128 blocks for fp8_deepseek, one scale per expert for
fp8_tensor).
    forward  y_g  = x_g W_g      x: row_tiles (1 x 128 along K; rows need no padding)
    dgrad    dx_g = dy_g W_g^T   dy: row_tiles
    wgrad    dW_g = x_g^T dy_g   contraction over group g's rows: x and dy are re-tiled
                                 128 x 1 along rows, with every group's rows starting at a
                                 multiple of 128 so that no tile spans two groups
Every GEMM is in NT form (`gemm.py`): W is quantized as W^T [G, N, K] (its transpose serves
dgrad) and the wgrad operands as x^T, dy^T.  K and N are zero-padded to the recipe's block
like the dense case (`fp8_linear`).

On the XLA path any group sizes work (wgrad scatters the rows into the 128-aligned layout).
On the kernel path (`gemm.use_kernel`) the rows must already be in the tile-aligned layout
(every group_sizes[g] a multiple of 128, as the MoE dispatch lays them out for fp8); other
group sizes give NaN outputs and gradients, never silently wrong ones.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from frontier_jax.kernels.grouped_gemm import TILE_ROWS, padded_groups, padded_rows_bound
from frontier_jax.precision import gemm
from frontier_jax.precision.gemm import row_groups, scaled_grouped_matmul, scaled_grouped_matmul_tn
from frontier_jax.precision.quantize import pad_to_multiple, quantize
from frontier_jax.precision.quantize_activation import quantize_activation
from frontier_jax.precision.recipe import E4M3, FP8_WEIGHT, Fp8Recipe


def fp8_grouped_matmul(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, recipe: Fp8Recipe, where: str = ""
) -> jax.Array:
    """x [M, K], w [G, K, N], group_sizes [G] -> [M, N] in x's dtype; `where` names the layer
    in a warning should a GEMM fall back to the XLA path."""
    return _grouped(x, w.astype(x.dtype), group_sizes.astype(jnp.int32), recipe, where, x.shape[1])


def group_aligned_rows(group_sizes: jax.Array, rows: int, align: int) -> tuple[jax.Array, jax.Array]:
    """Layout with every group's rows starting at a multiple of `align`.

    Returns (dest [rows]: padded position of each row, P = the overflow slot for rows past
    sum(group_sizes); tile_group [P / align]: group of each tile of `align` rows, G for unused
    tiles), with P = the static bound `padded_rows_bound(rows, G, align)`."""
    g = group_sizes.shape[0]
    padded, padded_start = padded_groups(group_sizes, align)
    p = padded_rows_bound(rows, g, align)
    group = row_groups(group_sizes, rows)
    safe = jnp.minimum(group, g - 1)
    start = jnp.cumsum(group_sizes) - group_sizes
    dest = jnp.where(group < g, padded_start[safe] + jnp.arange(rows) - start[safe], p)
    tile_group = row_groups(padded // align, p // align)
    return dest, tile_group


def _to_aligned(rows: jax.Array, dest: jax.Array, tiles: int, align: int) -> jax.Array:
    """rows [M, C] -> [tiles * align, C] with row i at dest[i] (overflow dropped), zeros elsewhere."""
    buf = jnp.zeros((tiles * align + 1, rows.shape[1]), rows.dtype)
    return buf.at[dest].set(rows)[:-1]


def _aligned_rows(a: jax.Array, group_sizes: jax.Array, align: int) -> tuple[jax.Array, jax.Array]:
    """(a [P, C] with every group's rows starting at a multiple of `align`, tile_group
    [P / align]): on the kernel path a's rows already are (padded at the end to whole tiles),
    on the XLA path they are scattered into that layout (`group_aligned_rows`)."""
    if gemm.use_kernel():
        a = pad_to_multiple(a, (align, 1))
        return a, row_groups(group_sizes // align, a.shape[0] // align)
    dest, tile_group = group_aligned_rows(group_sizes, a.shape[0], align)
    return _to_aligned(a, dest, tile_group.shape[0], align), tile_group


def _quantize_for_gemms(a: jax.Array, group_sizes: jax.Array, qtype, recipe: Fp8Recipe):
    """(rows operand of a [M', C], transposed cols operand of a in the aligned layout, tile
    group of each aligned row tile), M' >= M.  On the kernel path the aligned layout is a
    itself, so one fused pass gives both operands.  Per-tensor scales (block None) need no
    alignment for their scales, only for the per-tile group sums: they take the experts'
    128-row tile layout; fp8_deepseek's block is 128 too."""
    aligned, tile_group = _aligned_rows(a, group_sizes, recipe.block or TILE_ROWS)
    if gemm.use_kernel():
        return *quantize_activation(aligned, qtype, recipe), tile_group
    rows, _ = quantize_activation(a, qtype, recipe, cols=False)
    _, cols_t = quantize_activation(aligned, qtype, recipe, rows=False)
    return rows, cols_t, tile_group


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped(x, w, group_sizes, recipe, where, k):
    """Without a gradient (evaluation, inference) only the forward GEMM's x is quantized."""
    x_rows, _ = quantize_activation(x, E4M3, recipe, cols=False)
    return _product(x_rows, _weight_t(w, recipe), group_sizes, x.shape[0], w.shape[2], x.dtype, where)


def _weight_t(w: jax.Array, recipe: Fp8Recipe):
    """W^T [G, N, K], each expert quantized in weight_tiles, named `FP8_WEIGHT` for the remat
    policies."""
    b = recipe.multiple
    return checkpoint_name(
        quantize(pad_to_multiple(w.transpose(0, 2, 1), (1, b, b)), E4M3, (1, *recipe.weight_tiles)),
        FP8_WEIGHT,
    )


def _product(x_rows, wq, group_sizes, m: int, n: int, dtype, where: str) -> jax.Array:
    """y [M, N] from the quantized x rows (M or more) and W^T."""
    return scaled_grouped_matmul(x_rows, wq, group_sizes, dtype, where)[:m, :n]


def _forward(x, w, group_sizes, recipe: Fp8Recipe, where: str, k: int):
    """k = x.shape[1] (static, for the backward's slicing); residuals: W^T and x^T in fp8 (x^T
    quantized for the weight gradient here, in the same pass as the forward's x)."""
    wq = _weight_t(w, recipe)
    x_rows, x_cols_t, tile_group = _quantize_for_gemms(x, group_sizes, E4M3, recipe)
    y = _product(x_rows, wq, group_sizes, x.shape[0], w.shape[2], x.dtype, where)
    return y, (x_cols_t, wq, group_sizes, tile_group)


def _backward(recipe: Fp8Recipe, where: str, k: int, residuals, dy):
    x_cols_t, wq, group_sizes, tile_group = residuals
    (m, n), g, dtype = dy.shape, group_sizes.shape[0], dy.dtype
    dy_rows, dy_cols_t, _ = _quantize_for_gemms(dy, group_sizes, recipe.grad_dtype, recipe)
    dx = scaled_grouped_matmul(dy_rows, wq.transpose(0, 2, 1), group_sizes, dtype, where)
    dw = scaled_grouped_matmul_tn(x_cols_t, dy_cols_t, tile_group, g, dtype, where)
    if gemm.use_kernel():
        dw = gemm.flag_unaligned(dw, group_sizes)
    return dx[:m, :k], dw[:, :k, :n], None


_grouped.defvjp(_forward, _backward)
