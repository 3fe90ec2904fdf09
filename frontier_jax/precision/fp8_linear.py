"""fp8 projection y = x W whose forward and both backward GEMMs run in fp8 (`jax.custom_vjp`).

    forward  y  = x W        x: recipe.row_tiles (e4m3)      W^T: weight_tiles (e4m3)
    dgrad    dx = dy W^T     dy: row_tiles (grad_dtype)      W: the forward's quantized W^T,
                                                             transposed (square blocks)
    wgrad    dW = x^T dy     x, dy: col_tiles (re-tiled along the token axis M), transposed
with x [M, K], W [K, N], dy [M, N]; each GEMM is `gemm.scaled_matmul` in NT form (both
operands contracting on their last dim; XLA fuses the transposes into the quantization), fp32
accumulation.  Operands are zero-padded to multiples of the recipe's block (exact, see
`Fp8Recipe.multiple`) and results sliced back.  Residuals: the fp8 x^T (quantized for the
weight gradient in the forward's pass over x) and W^T, with their scales (W^T named
`FP8_WEIGHT` for the remat policies).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from frontier_jax.precision.gemm import scaled_matmul
from frontier_jax.precision.quantize import pad_to_multiple, quantize
from frontier_jax.precision.quantize_activation import quantize_activation
from frontier_jax.precision.recipe import E4M3, FP8_WEIGHT, Fp8Recipe


def fp8_matmul(x: jax.Array, w: jax.Array, recipe: Fp8Recipe, where: str = "") -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype (w is used in x's dtype); `where` names the
    layer in a warning should a GEMM fall back to the XLA path."""
    return _fp8_matmul(x, w.astype(x.dtype), recipe, where, x.shape[1])


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fp8_matmul(x, w, recipe, where, k):
    """Without a gradient (evaluation, inference) only the forward GEMM's x is quantized."""
    xq, _ = quantize_activation(x, E4M3, recipe, cols=False)
    return _product(xq, _weight_t(w, recipe), w.shape[1], x.dtype, where)


def _weight_t(w: jax.Array, recipe: Fp8Recipe):
    """W^T [N, K] quantized in weight_tiles, named `FP8_WEIGHT` for the remat policies."""
    b = recipe.multiple
    return checkpoint_name(quantize(pad_to_multiple(w.T, (b, b)), E4M3, recipe.weight_tiles), FP8_WEIGHT)


def _product(xq, wq, n: int, dtype, where: str) -> jax.Array:
    """y = x W [M, N] from the quantized x and W^T."""
    return scaled_matmul(xq, wq, dtype, where)[:, :n]


def _forward(x, w, recipe: Fp8Recipe, where: str, k: int):
    """k = x.shape[1] (static, for the backward's slicing)."""
    wq = _weight_t(w, recipe)
    xq, x_cols_t = quantize_activation(x, E4M3, recipe)
    return _product(xq, wq, w.shape[1], x.dtype, where), (x_cols_t, wq)


def _backward(recipe: Fp8Recipe, where: str, k: int, residuals, dy):
    x_cols_t, wq = residuals
    n = dy.shape[1]
    dy_rows, dy_cols_t = quantize_activation(dy, recipe.grad_dtype, recipe)
    dx = scaled_matmul(dy_rows, wq.T, dy.dtype, where)[:, :k]
    dw = scaled_matmul(x_cols_t, dy_cols_t, dy.dtype, where)[:k, :n]
    return dx, dw


_fp8_matmul.defvjp(_forward, _backward)


def fp8_dot_general(recipe: Fp8Recipe, *, layer: str, policy: str):
    """A `lax.dot_general` stand-in for `Linear`: x [..., *in] . W [*in, *out] -> [..., *out]
    (x's trailing dims contracted with W's leading dims, no batch dims), run as `fp8_matmul`
    on x [M, K] and W [K, N] flattened.  Anything else is refused, naming layer and policy."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision  # the recipe fixes the arithmetic
        (lhs_c, rhs_c), batch = dimension_numbers
        r = len(lhs_c)
        supported = (
            tuple(lhs_c) == tuple(range(lhs.ndim - r, lhs.ndim))
            and tuple(rhs_c) == tuple(range(r))
            and not any(batch)
            and jnp.issubdtype(lhs.dtype, jnp.floating)
            and lhs.dtype.itemsize > 1
        )
        if not supported:
            raise ValueError(
                f"layer {layer!r}: precision.policy={policy} runs fp8 GEMMs for x[..., K] @ "
                f"W[K, ...] on bf16/fp16/fp32 operands only; got lhs {lhs.shape} {lhs.dtype}, "
                f"rhs {rhs.shape}, dimension_numbers {dimension_numbers}"
            )
        k = math.prod(lhs.shape[lhs.ndim - r :])
        y = fp8_matmul(
            lhs.reshape(-1, k),
            rhs.reshape(k, -1),
            recipe,
            where=f"layer {layer!r} (precision.policy={policy})",
        )
        return y.reshape(*lhs.shape[: lhs.ndim - r], *rhs.shape[r:]).astype(
            preferred_element_type or lhs.dtype
        )

    return dot_general
