"""Products whose forward returns fp32 and whose backward runs in the operands' dtype.

A plain `lax.dot_general(a, b, preferred_element_type=float32)` on bf16 operands returns
fp32, and its transpose then multiplies the fp32 cotangent with the bf16 operands: XLA runs
those backward GEMMs in fp32 (tf32) at under half the bf16 rate and reads twice the bytes.
Here the cotangent is rounded to the operands' dtype first, so every backward GEMM is a
bf16 x bf16 product accumulated in fp32 (what cuBLAS does) with results in the operands' dtype:

    y = a . b  (fp32)        da = round(dy) . b^T        db = a^T . round(dy)

With fp32 operands (the fp32 policy) this is exactly the plain product and its gradient.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp


def _fp32_out_low_precision_grad(product: Callable) -> Callable:
    """product(spec, a, b, out_dtype) -> the custom-VJP function f(spec, a, b)."""

    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def f(spec, a, b):
        return product(spec, a, b, jnp.float32)

    def forward(spec, a, b):
        return product(spec, a, b, jnp.float32), (a, b)

    def backward(spec, residuals, dy):
        a, b = residuals
        _, vjp = jax.vjp(lambda a, b: product(spec, a, b, a.dtype), a, b)
        return vjp(dy.astype(a.dtype))

    f.defvjp(forward, backward)
    return f


_dot_general = _fp32_out_low_precision_grad(
    lambda dims, a, b, out: jax.lax.dot_general(a, b, dims, preferred_element_type=out)
)
_einsum = _fp32_out_low_precision_grad(
    lambda equation, a, b, out: jnp.einsum(equation, a, b, preferred_element_type=out)
)


def dot_general_fp32(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> jax.Array:
    """`lax.dot_general` returning fp32, with gradients computed in the operands' dtype."""
    (lc, rc), (lb, rb) = dimension_numbers
    dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    return _dot_general(dims, lhs, rhs)


def einsum_fp32(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Two-operand `jnp.einsum` returning fp32, with gradients in the operands' dtype."""
    return _einsum(equation, a, b)
