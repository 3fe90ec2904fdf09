"""The Pallas grouped GEMM (interpreter on CPU) against a float64 loop over rows and groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.kernels.grouped_gemm import (
    SHARED_MEMORY_BUDGET,
    TILE_ROWS,
    RowTiling,
    Tilings,
    WeightTiling,
    _stages,
    tile_groups,
    tiled_grouped_matmul,
)


def _reference(x, w, dy, sizes):
    """float64 y = x W[g], dx = dy W[g]^T, dW[g] = sum_r x_r^T dy_r, row by row."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    for r, g in enumerate(np.repeat(np.arange(len(sizes)), sizes)):
        y[r], dx[r] = x[r] @ w[g], w[g] @ dy[r]
        dw[g] += np.outer(x[r], dy[r])
    return y, dx, dw


# The float32 bound on the relative Frobenius error: 1e-5 in the CPU interpreter; on a GPU the
# Pallas (Triton) fp32 dot runs as TF32 (10-bit mantissa; measured 2.9e-4 on an H200): 2e-3.
FP32_TOL = 1e-5 if jax.default_backend() == "cpu" else 2e-3


def _rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def _problem(seed, sizes, tiles, k, n, dtype):
    rng = np.random.default_rng(seed)
    m = tiles * TILE_ROWS
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[int(np.sum(sizes)) :] = 0.0  # the dispatch leaves rows past the groups zero
    w = rng.standard_normal((len(sizes), k, n)).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    dy[int(np.sum(sizes)) :] = 0.0
    return (jnp.asarray(a, dtype) for a in (x, w, dy))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, 1e-2)])
def test_forward_and_both_gradients_match_float64(dtype, tol):
    sizes = np.array([128, 0, 256, 128, 0])  # empty groups, and one unused tile at the end
    x, w, dy = _problem(0, sizes, 5, 64, 96, dtype)
    y, vjp = jax.vjp(lambda x, w: tiled_grouped_matmul(x, w, jnp.asarray(sizes)), x, w)
    dx, dw = vjp(dy)
    ref_y, ref_dx, ref_dw = _reference(
        x.astype(jnp.float32), w.astype(jnp.float32), dy.astype(jnp.float32), sizes
    )
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert _rel(y, ref_y) < tol and _rel(dx, ref_dx) < tol and _rel(dw, ref_dw) < tol
    assert not np.asarray(y[512:], np.float32).any()  # the unused tile is written as zeros
    assert not np.asarray(dw[1], np.float32).any() and not np.asarray(dw[4], np.float32).any()


def test_small_tiles_cover_several_blocks_per_dimension():
    sizes = np.array([256, 128])
    tilings = Tilings(
        RowTiling(block_out=32, block_contract=16),
        RowTiling(32, 16),
        WeightTiling(block_k=16, block_n=32, block_rows=32),
    )
    x, w, dy = _problem(1, sizes, 3, 48, 64, jnp.float32)
    y, vjp = jax.vjp(lambda x, w: tiled_grouped_matmul(x, w, jnp.asarray(sizes), tilings), x, w)
    dx, dw = vjp(dy)
    for ours, ref in zip((y, dx, dw), _reference(x, w, dy, sizes)):
        assert _rel(ours, ref) < FP32_TOL


def test_tile_groups_marks_tiles_past_the_last_group():
    tile_group, tile_start = tile_groups(jnp.asarray([256, 0, 128]), 5)
    np.testing.assert_array_equal(tile_group, [0, 0, 2, 3, 3])
    np.testing.assert_array_equal(tile_start, [0, 2, 2, 3])


def test_bad_shapes_are_refused_with_the_sizes():
    w = jnp.zeros((2, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of the row tile"):
        tiled_grouped_matmul(jnp.zeros((100, 64)), w, jnp.asarray([0, 0]))
    with pytest.raises(ValueError, match=r"\[M, K\] and \[G, K, N\]"):
        tiled_grouped_matmul(jnp.zeros((128, 32)), w, jnp.asarray([0, 0]))
    with pytest.raises(ValueError, match="output width = 40"):
        tiled_grouped_matmul(jnp.zeros((128, 64)), jnp.zeros((2, 64, 40)), jnp.asarray([0, 0]))


def test_pipeline_stages_fit_shared_memory_for_float32_operands():
    """The default row tiles (128 x 64 rows tile + 64 x 256 weight tile): 3 stages in bf16
    (144 KiB), 2 in float32 (3 would ask 288 KiB of Hopper's 227); never fewer than 1."""
    tile = 128 * 64 + 64 * 256
    assert _stages(3, 2, tile) == 3
    assert _stages(3, 4, tile) == 2
    assert 2 * 4 * tile <= SHARED_MEMORY_BUDGET < 3 * 4 * tile
    assert _stages(3, 4, 10 * tile) == 1
