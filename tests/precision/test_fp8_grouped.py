"""fp8 grouped (expert) matmul: the three GEMMs against the float64 per-group reference and
against a loop of dense fp8 projections; routing through `grouped_matmul` and the policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.ops.grouped_matmul import grouped_matmul
from frontier_jax.precision import FP8_DEEPSEEK, FP8_TENSOR, PrecisionPolicy, get_policy
from frontier_jax.precision.fp8_grouped import fp8_grouped_matmul, group_aligned_rows
from frontier_jax.precision.fp8_linear import fp8_matmul

from . import reference as ref

# an empty group, a group of more than 128 rows, and 10 trailing rows past sum(sizes)
GROUP_SIZES = np.array([30, 0, 150, 60], np.int32)
M = int(GROUP_SIZES.sum()) + 10
SHAPES = {"aligned": (256, 128), "padded": (96, 130)}  # (K, N)


@jax.jit(static_argnums=4)
def _forward_and_grads(x, w, dy, group_sizes, recipe):
    y = fp8_grouped_matmul(x, w, group_sizes, recipe)
    loss = lambda a, b: jnp.vdot(fp8_grouped_matmul(a, b, group_sizes, recipe), dy)
    return (y, *jax.grad(loss, argnums=(0, 1))(x, w))


def _operands(k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, k)) * 10.0 ** rng.uniform(-2, 2, (M, 1))
    x[GROUP_SIZES.sum() :] *= 1e-3  # rows past the groups: not the amax of a per-tensor scale
    w = 0.05 * rng.standard_normal((len(GROUP_SIZES), k, n))
    dy = 1e-3 * rng.standard_normal((M, n))
    return tuple(a.astype(np.float32) for a in (x, w, dy))


def _rel(got, want):
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(
    "recipe,grad_fmt", [(FP8_DEEPSEEK, "e4m3"), (FP8_TENSOR, "e5m2")], ids=["fp8_deepseek", "fp8_tensor"]
)
def test_grouped_gemms_match_the_per_group_reference(recipe, grad_fmt, shape):
    x, w, dy = _operands(*shape)
    y, dx, dw = _forward_and_grads(x, w, dy, jnp.asarray(GROUP_SIZES), recipe)
    n_valid = int(GROUP_SIZES.sum())
    want = ref.grouped(x[:n_valid], w, dy[:n_valid], GROUP_SIZES, recipe.block, grad_fmt)
    for which, got, expected in zip(("y", "dx", "dW"), (y[:n_valid], dx[:n_valid], dw), want):
        assert _rel(got, expected) < 1e-6, which  # observed <= 1.1e-7
    assert np.all(np.asarray(y[n_valid:]) == 0) and np.all(np.asarray(dx[n_valid:]) == 0)
    assert np.all(np.asarray(dw[1]) == 0)  # the empty group


def test_grouped_equals_a_loop_of_dense_fp8_projections():
    """With 1 x 128 row tiles and group-aligned 128 x 1 wgrad tiles, each group is exactly a dense
    fp8_deepseek projection of its own rows (per-tensor scales would span all groups instead)."""
    x, w, dy = _operands(*SHAPES["padded"], seed=1)
    y, dx, dw = _forward_and_grads(x, w, dy, jnp.asarray(GROUP_SIZES), FP8_DEEPSEEK)
    dense = jax.jit(
        lambda a, b, c: (
            fp8_matmul(a, b, FP8_DEEPSEEK),
            *jax.vjp(lambda p, q: fp8_matmul(p, q, FP8_DEEPSEEK), a, b)[1](c),
        )
    )
    start = 0
    for g, n in enumerate(GROUP_SIZES):
        if n:
            rows = slice(start, start + n)
            yg, dxg, dwg = dense(x[rows], w[g], dy[rows])
            np.testing.assert_allclose(y[rows], yg, rtol=1e-6, atol=1e-6 * np.abs(yg).max())
            np.testing.assert_allclose(dx[rows], dxg, rtol=1e-6, atol=1e-6 * np.abs(dxg).max())
            np.testing.assert_allclose(dw[g], dwg, rtol=1e-6, atol=1e-6 * np.abs(dwg).max())
        start += n


def test_group_aligned_layout():
    dest, tile_group = group_aligned_rows(jnp.asarray(GROUP_SIZES), M, 128)
    # group starts 0, 128 (empty group: no tiles), 128, 384 -> tiles [0, 2, 2, 3], rest unused (4)
    np.testing.assert_array_equal(tile_group, [0, 2, 2, 3, 4, 4])
    np.testing.assert_array_equal(dest[:30], np.arange(30))
    np.testing.assert_array_equal(dest[30:180], 128 + np.arange(150))
    np.testing.assert_array_equal(dest[180:240], 384 + np.arange(60))
    assert np.all(np.asarray(dest[240:]) == 6 * 128)  # past the groups: overflow slot


def test_grouped_matmul_routes_expert_layers_through_the_policy():
    x, w, _ = _operands(*SHAPES["padded"], seed=2)
    sizes = jnp.asarray(GROUP_SIZES)
    run = lambda policy, layer="moe.experts.w_up": np.asarray(
        grouped_matmul(x, w, sizes, impl="ragged_dot", dtype=jnp.float32, policy=policy, layer=layer)
    )
    fp8 = np.asarray(fp8_grouped_matmul(x, w, sizes, FP8_DEEPSEEK))
    plain = np.asarray(grouped_matmul(x, w, sizes, impl="ragged_dot", dtype=jnp.float32))
    np.testing.assert_array_equal(run(get_policy("fp8_deepseek")), fp8)
    np.testing.assert_array_equal(run(get_policy("fp32")), plain)
    only_attention = PrecisionPolicy("fp8_mla_only", jnp.float32, fp8=FP8_DEEPSEEK, fp8_layers=("mla.*",))
    np.testing.assert_array_equal(run(only_attention), plain)
    assert not np.allclose(fp8, plain, rtol=1e-3)
