"""fp8 projection (forward, dgrad, wgrad through the custom_vjp) against the float64 reference of
the same quantized math (tight) and against the exact product (loose, fp8-level)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.precision import FP8_DEEPSEEK, FP8_TENSOR
from frontier_jax.precision.fp8_linear import fp8_matmul

from . import reference as ref

RECIPES = {"fp8_deepseek": (FP8_DEEPSEEK, "e4m3"), "fp8_tensor": (FP8_TENSOR, "e5m2")}
SHAPES = {"aligned": (256, 256, 384), "padded": (200, 96, 130)}  # (M, K, N)


@jax.jit(static_argnums=3)
def _forward_and_grads(x, w, dy, recipe):
    """(y, dx, dW) with the gradients from jax.grad of <y, dy> through the custom_vjp."""
    y = fp8_matmul(x, w, recipe)
    dx, dw = jax.grad(lambda a, b: jnp.vdot(fp8_matmul(a, b, recipe), dy), argnums=(0, 1))(x, w)
    return y, dx, dw


def _operands(m, k, n, seed=0):
    """x with per-row magnitudes over 4 decades (what per-tile scaling is for), small w, dy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-2, 2, (m, 1))
    w = 0.05 * rng.standard_normal((k, n))
    dy = 1e-3 * rng.standard_normal((m, n))
    return tuple(a.astype(np.float32) for a in (x, w, dy))


def _rel(got, want):
    """Largest absolute error relative to the largest reference magnitude."""
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


def _frobenius_rel(got, want):
    return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", RECIPES)
def test_three_gemms_match_the_quantized_reference_and_the_exact_product(name, shape):
    recipe, grad_fmt = RECIPES[name]
    x, w, dy = _operands(*shape)
    got = _forward_and_grads(x, w, dy, recipe)
    want = ref.linear(x, w, dy, recipe.block, grad_fmt)  # unpadded data, partial last tiles
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    exact = (x64 @ w64, dy64 @ w64.T, x64.T @ dy64)
    for which, g, q, e in zip(("y", "dx", "dW"), got, want, exact):
        assert g.shape == e.shape
        # fp32 accumulation of the same fp8 products: observed <= 1.2e-7
        assert _rel(g, q) < 1e-6, which
        # fp8 rounding: e4m3 alone ~0.037 (observed), with e5m2 gradients ~0.059
        assert _frobenius_rel(g, e) < (0.05 if which == "y" or grad_fmt == "e4m3" else 0.08), which


def test_per_tile_scaling_keeps_small_rows_that_per_tensor_scaling_flushes():
    x, w, dy = _operands(256, 256, 128, seed=1)
    row_scale = np.where(np.arange(256) % 2, 1.0, 1e-6)[:, None].astype(np.float32)
    x = x / np.abs(x).max(1, keepdims=True) * row_scale
    exact = x.astype(np.float64) @ w
    row_error = {}
    for name, (recipe, _) in RECIPES.items():
        y = np.asarray(_forward_and_grads(x, w, dy, recipe)[0], np.float64)
        row_error[name] = np.linalg.norm(y - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert row_error["fp8_deepseek"].max() < 0.06
    # 1e-6 * 448 is below half of e4m3's smallest subnormal 2^-9: those rows round to zero
    assert np.all(row_error["fp8_tensor"][::2] == 1.0) and row_error["fp8_tensor"][1::2].max() < 0.06


def test_nan_in_a_tile_reaches_exactly_the_outputs_it_feeds():
    x, w, dy = _operands(256, 256, 384, seed=2)
    x[3, 5] = np.nan
    y, dx, dw = (np.asarray(a) for a in _forward_and_grads(x, w, dy, FP8_DEEPSEEK))
    assert np.all(np.isnan(y[3])) and np.all(np.isfinite(np.delete(y, 3, axis=0)))
    assert np.all(np.isfinite(dx))  # dx = dy W^T does not read x
    assert np.all(np.isnan(dw[5])) and np.all(np.isfinite(np.delete(dw, 5, axis=0)))
    x[3, 5] = 1.0
    dy[7, 300] = np.inf
    y, dx, dw = (np.asarray(a) for a in _forward_and_grads(x, w, dy, FP8_DEEPSEEK))
    assert np.all(np.isfinite(y))
    assert np.all(np.isnan(dx[7])) and np.all(np.isfinite(np.delete(dx, 7, axis=0)))
    assert np.all(np.isnan(dw[:, 300])) and np.all(np.isfinite(np.delete(dw, 300, axis=1)))


def test_all_zero_input_gives_zero_output_and_no_nan():
    _, w, dy = _operands(200, 96, 130)
    zeros = np.zeros((200, 96), np.float32)
    y, dx, dw = (np.asarray(a) for a in _forward_and_grads(zeros, w, dy, FP8_DEEPSEEK))
    assert np.all(y == 0) and np.all(dw == 0) and np.all(np.isfinite(dx))


def test_bf16_operands_give_bf16_results():
    x, w, dy = (jnp.asarray(a, jnp.bfloat16) for a in _operands(128, 128, 128))
    assert all(a.dtype == jnp.bfloat16 for a in _forward_and_grads(x, w, dy, FP8_DEEPSEEK))


def _amaxes(jaxpr) -> int:
    """reduce_max equations (one per quantized operand) in a jaxpr and its sub-jaxprs."""
    return sum(
        (eqn.primitive.name == "reduce_max")
        + sum(_amaxes(sub) for sub in jax.core.jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


def test_a_forward_without_gradient_quantizes_only_its_operands():
    # evaluation/inference: x once (1 x 128 rows, no x^T for a weight gradient) and W once,
    # for the projection and the grouped expert matmul alike; under jax.grad the forward also
    # quantizes x^T (its residual)
    from frontier_jax.precision.fp8_grouped import fp8_grouped_matmul

    x, w, _ = _operands(256, 256, 128)
    sizes = jnp.array([128, 128], jnp.int32)
    grouped_w = np.stack([w, w])
    for fn, args in [
        (lambda x, w: fp8_matmul(x, w, FP8_DEEPSEEK), (x, w)),
        (lambda x, w: fp8_grouped_matmul(x, w, sizes, FP8_DEEPSEEK), (x, grouped_w)),
    ]:
        assert _amaxes(jax.make_jaxpr(fn)(*args).jaxpr) == 2
        forward_for_grad = jax.make_jaxpr(lambda x, w: jax.vjp(fn, x, w)[0])(*args).jaxpr
        assert _amaxes(forward_for_grad) == 3
