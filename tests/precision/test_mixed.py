"""fp32-output products with low-precision backward: forward equals the fp32-accumulated
product, gradients equal the products of the rounded cotangent (computed here in float64)."""

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.precision.mixed import dot_general_fp32, einsum_fp32


def _bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def test_forward_is_fp32_and_backward_uses_the_rounded_cotangent():
    rng = np.random.default_rng(0)
    a, b = _bf16(rng, (6, 5)), _bf16(rng, (5, 7))
    dy = jnp.asarray(rng.standard_normal((6, 7)), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: einsum_fp32("mk,kn->mn", a, b), a, b)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, a64 @ b64, rtol=1e-6, atol=1e-6)
    da, db = vjp(dy)
    assert da.dtype == db.dtype == jnp.bfloat16
    dy_rounded = np.asarray(dy.astype(jnp.bfloat16), np.float64)
    # results are rounded to bf16 once: within 2^-8 relative of the exact products
    np.testing.assert_allclose(np.asarray(da, np.float64), dy_rounded @ b64.T, rtol=2**-8, atol=1e-2)
    np.testing.assert_allclose(np.asarray(db, np.float64), a64.T @ dy_rounded, rtol=2**-8, atol=1e-2)


def test_fp32_operands_give_the_plain_gradient():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)
    dims = (((2,), (0,)), ((), ()))
    ours = jax.grad(lambda a, b: jnp.sum(jnp.sin(dot_general_fp32(a, b, dims))), (0, 1))(a, b)
    plain = jax.grad(lambda a, b: jnp.sum(jnp.sin(jax.lax.dot_general(a, b, dims))), (0, 1))(a, b)
    for x, y in zip(ours, plain):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
