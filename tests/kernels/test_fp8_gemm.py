"""Blockwise-scaled fp8 GEMM kernels (Pallas interpret mode on CPU) against the XLA reference
of `precision.gemm` on the same quantized operands (same math in fp32: ~1e-7 apart) and a
float64 numpy product of the dequantized operands; zero tiles, NaN, per-tensor / per-row /
blockwise scales, shape errors, the grouped layouts, and the wiring of the fp8 projections
through the kernels (`gemm.use_kernel` forced on)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from frontier_jax.kernels.fp8_gemm import (
    Fp8Tiling,
    _tile_ids,
    fp8_grouped_rows_nt,
    fp8_grouped_weight_grad_nt,
    fp8_matmul_nt,
)
from frontier_jax.precision import FP8_DEEPSEEK, FP8_TENSOR, gemm
from frontier_jax.precision.fp8_grouped import fp8_grouped_matmul
from frontier_jax.precision.fp8_linear import fp8_matmul
from frontier_jax.precision.quantize import expand_scale, quantize
from frontier_jax.precision.recipe import E4M3, E5M2

M, N, K = 256, 256, 384
SCALES = {  # name -> (a format, a tiles, b format, b tiles)
    "blockwise": (E4M3, (1, 128), E4M3, (128, 128)),
    "per_row_b": (E4M3, (1, 128), E4M3, (1, 128)),
    "per_tensor": (E4M3, (None, None), E4M3, (None, None)),
    "mixed_formats": (E5M2, (1, 128), E4M3, (128, 128)),
}


def _data(shape, seed):
    """Normal data whose rows span magnitudes 1e-2 .. 1e2."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2, (shape[0], 1)), jnp.float32)


def _float64(q: qwix.QArray) -> np.ndarray:
    """The dequantized operand q s in float64."""
    return np.asarray(q.qvalue.astype(jnp.float32), np.float64) * np.asarray(
        expand_scale(q.scale, q.shape), np.float64
    )


# The bound on |kernel - reference|_max / |reference|_max.  The CPU interpreter sums the fp8
# products in exact fp32: 1e-6.  Hopper's fp8 tensor cores accumulate in reduced precision
# (DeepSeek-V3 report, section 3.3.2; measured 2.0e-4 on an H200): 1e-3 on a GPU.
EXACT = 1e-6 if jax.default_backend() == "cpu" else 1e-3


def _rel(got, want):
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


def _operands(scales, m=M, n=N, k=K, seed=0):
    fa, ta, fb, tb = SCALES[scales]
    return quantize(_data((m, k), seed), fa, ta), quantize(_data((n, k), seed + 1), fb, tb)


# default; wide; lagged scaling over a partial band of row blocks (4 blocks in bands of 3);
# row by row with Pallas' own dot lowering; tensor-core accumulation over all of K
DENSE_TILINGS = ["128x128w8s4g8", "64x256w4s4g8", "64x128w4s3g3l", "128x128w4s4g1p", "64x128w4s4g2f"]


@pytest.mark.parametrize("tiling", [Fp8Tiling.parse(t) for t in DENSE_TILINGS], ids=DENSE_TILINGS)
@pytest.mark.parametrize("scales", SCALES)
def test_dense_kernel_matches_xla_and_float64(scales, tiling):
    a, b = _operands(scales)
    got = fp8_matmul_nt(a.qvalue, a.scale, b.qvalue, b.scale, tiling=tiling)
    assert got.dtype == jnp.float32 and got.shape == (M, N)
    assert _rel(got, np.asarray(gemm._xla_scaled_matmul(a, b), np.float64)) < EXACT
    assert _rel(got, _float64(a) @ _float64(b).T) < EXACT


@pytest.mark.parametrize(
    "ni, nj, group_m", [(4, 3, 8), (5, 3, 2), (7, 4, 3), (1, 5, 8), (6, 1, 4), (3, 3, 1)]
)
def test_program_order_visits_every_tile_once(ni, nj, group_m):
    pids = jnp.arange(ni * nj, dtype=jnp.int32)
    i, j = jax.vmap(lambda p: _tile_ids(p, ni, nj, group_m))(pids)
    tiles = sorted(zip(np.asarray(i).tolist(), np.asarray(j).tolist()))
    assert tiles == [(a, b) for a in range(ni) for b in range(nj)]
    if group_m > 1 and ni >= group_m:  # a band's first column block comes first
        assert np.asarray(j)[:group_m].tolist() == [0] * group_m


def test_tiling_names_round_trip():
    for name in [*DENSE_TILINGS, "128x256w8s3g16lf"]:
        assert Fp8Tiling.parse(name).name == name
    assert Fp8Tiling.parse("128x128w8s4") == Fp8Tiling(128, 128, 8, 4)
    with pytest.raises(ValueError, match="is not like"):
        Fp8Tiling.parse("128x128")


def test_dense_kernel_bf16_output_and_zero_tiles():
    x = _data((M, K), 2).at[:128, 128:256].set(0.0).at[200].set(0.0)
    a, b = quantize(x, E4M3, (1, 128)), _operands("blockwise")[1]
    got = fp8_matmul_nt(a.qvalue, a.scale, b.qvalue, b.scale, out_dtype=jnp.bfloat16)
    want = np.asarray(gemm._xla_scaled_matmul(a, b).astype(jnp.bfloat16), np.float32)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32)[200], 0.0)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_a_tile_reaches_every_output_it_feeds(bad):
    """A NaN or inf makes its tile's scale NaN (`quantize`, on every backend), hence every
    output the tile feeds non-finite: row 5 (a's 1 x 128 tile) and the columns of b's block
    rows 128..255.  (XLA:CPU's max reduction drops NaN: without the NaN-carrying amax only
    row 5 and column 130 would be, and the GPU, whose max propagates NaN, would disagree.)"""
    x = _data((M, K), 3).at[5, 300].set(bad)
    w = _data((N, K), 4).at[130, 7].set(bad)
    a, b = quantize(x, E4M3, (1, 128)), quantize(w, E4M3, (128, 128))
    got = np.asarray(fp8_matmul_nt(a.qvalue, a.scale, b.qvalue, b.scale))
    poisoned = np.zeros((M, N), bool)
    poisoned[5, :] = True
    poisoned[:, 128:256] = True
    np.testing.assert_array_equal(~np.isfinite(got), poisoned)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(gemm._xla_scaled_matmul(a, b)))


def test_shape_errors_name_the_shapes():
    a, b = _operands("blockwise")
    with pytest.raises(ValueError, match=r"M = 256 is not a multiple of its tile 512"):
        fp8_matmul_nt(a.qvalue, a.scale, b.qvalue, b.scale, tiling=Fp8Tiling(block_m=512))
    with pytest.raises(ValueError, match=r"contraction width 320 is not a multiple of 128"):
        fp8_matmul_nt(a.qvalue[:, :320], a.scale, b.qvalue[:, :320], b.scale)
    with pytest.raises(ValueError, match=r"contraction widths differ"):
        fp8_matmul_nt(a.qvalue, a.scale, b.qvalue[:, :256], b.scale[:, :2])


# group 1 empty; the last 128-row tile is past the groups (zeros)
GROUP_SIZES = np.array([128, 0, 256, 128], np.int32)
ROWS = int(GROUP_SIZES.sum()) + 128


@pytest.mark.parametrize("tiling", ["128x128w8s4", "64x128w4s3l"])
@pytest.mark.parametrize("scales", ["blockwise", "per_tensor", "mixed_formats"])
def test_grouped_rows_kernel_matches_xla_and_per_group_float64(scales, tiling):
    fa, ta, fb, tb = SCALES[scales]
    a = quantize(_data((ROWS, K), 5), fa, ta)
    w = quantize(_data((len(GROUP_SIZES) * N, K), 6).reshape(len(GROUP_SIZES), N, K), fb, (1, *tb))
    tile_group = gemm.row_groups(jnp.asarray(GROUP_SIZES) // 128, ROWS // 128)
    got = np.asarray(
        fp8_grouped_rows_nt(a.qvalue, a.scale, w.qvalue, w.scale, tile_group, tiling=Fp8Tiling.parse(tiling))
    )
    xla = np.asarray(gemm._xla_scaled_grouped_matmul(a, w, jnp.asarray(GROUP_SIZES)), np.float64)
    assert _rel(got, xla) < EXACT
    ad, wd, start = _float64(a), _float64(w), 0
    for g, size in enumerate(GROUP_SIZES):
        if size:
            rows = slice(start, start + size)
            assert _rel(got[rows], ad[rows] @ wd[g].T) < EXACT
        start += size
    assert np.all(got[start:] == 0)


@pytest.mark.parametrize("tiling", ["128x128w8s4", "128x64w4s3l"])
@pytest.mark.parametrize("tiles", [(1, 128), (None, None)], ids=["per_tile", "per_tensor"])
def test_grouped_weight_grad_kernel_matches_xla_and_float64(tiles, tiling):
    """x^T [K, P] and dy^T [N, P] quantized per 128 rows of x / dy: dW[g] over g's tiles."""
    x_t = quantize(_data((K, ROWS), 7), E4M3, tiles)
    dy_t = quantize(_data((N, ROWS), 8), E4M3, tiles)
    tile_group = gemm.row_groups(jnp.asarray(GROUP_SIZES) // 128, ROWS // 128)
    tile_start = jnp.searchsorted(tile_group, jnp.arange(len(GROUP_SIZES) + 1), side="left")
    got = np.asarray(
        fp8_grouped_weight_grad_nt(
            x_t.qvalue, x_t.scale, dy_t.qvalue, dy_t.scale, tile_start, tiling=Fp8Tiling.parse(tiling)
        )
    )
    xla = gemm._xla_scaled_grouped_matmul_tn(x_t, dy_t, tile_group, len(GROUP_SIZES))
    assert _rel(got, np.asarray(xla, np.float64)) < EXACT
    xd, dyd, start = _float64(x_t), _float64(dy_t), 0
    for g, size in enumerate(GROUP_SIZES):
        rows = slice(start, start + size)
        if size:
            assert _rel(got[g], xd[:, rows] @ dyd[:, rows].T) < EXACT
        else:
            assert np.all(got[g] == 0)
        start += size


@pytest.fixture
def kernel_path(monkeypatch):
    """Routes `precision.gemm` through the kernels (interpret mode off the GPU)."""
    monkeypatch.setattr(gemm, "use_kernel", lambda: True)


def _linear_with_grads(x, w, dy, recipe):
    return jax.jit(
        lambda a, b, c: (
            fp8_matmul(a, b, recipe),
            *jax.vjp(lambda p, q: fp8_matmul(p, q, recipe), a, b)[1](c),
        )
    )(x, w, dy)


def _grouped_with_grads(x, w, dy, sizes, recipe):
    f = lambda p, q: fp8_grouped_matmul(p, q, sizes, recipe)
    return jax.jit(lambda a, b, c: (f(a, b), *jax.vjp(f, a, b)[1](c)))(x, w, dy)


def _assert_same(got, want):
    for g, w in zip(got, want):
        w = np.asarray(w, np.float64)
        assert _rel(g, w) < EXACT and np.array_equal(np.isnan(np.asarray(g)), np.isnan(w))


def test_projection_runs_through_the_kernels_with_the_xla_semantics(monkeypatch):
    x, w, dy = _data((200, 256), 9), 0.05 * _data((256, 300), 10), _data((200, 300), 11)
    want = _linear_with_grads(x, w, dy, FP8_DEEPSEEK)
    monkeypatch.setattr(gemm, "use_kernel", lambda: True)
    _assert_same(_linear_with_grads(x, w, dy, FP8_DEEPSEEK), want)


@pytest.mark.parametrize("recipe", [FP8_DEEPSEEK, FP8_TENSOR], ids=["fp8_deepseek", "fp8_tensor"])
def test_grouped_projection_runs_through_the_kernels_with_the_xla_semantics(recipe, monkeypatch):
    sizes = jnp.asarray(GROUP_SIZES)
    x, dy = _data((ROWS, 256), 12), 1e-3 * _data((ROWS, 200), 13)
    w = 0.05 * _data((len(GROUP_SIZES) * 256, 200), 14).reshape(len(GROUP_SIZES), 256, 200)
    want = _grouped_with_grads(x, w, dy, sizes, recipe)
    monkeypatch.setattr(gemm, "use_kernel", lambda: True)
    _assert_same(_grouped_with_grads(x, w, dy, sizes, recipe), want)


def test_grouped_kernel_path_flags_group_sizes_off_the_tile_layout(kernel_path):
    sizes = jnp.asarray([100, 156, 0, 128], jnp.int32)
    x, dy = _data((512, 128), 15), _data((512, 128), 16)
    w = _data((4 * 128, 128), 17).reshape(4, 128, 128)
    for out in _grouped_with_grads(x, w, dy, sizes, FP8_DEEPSEEK):
        assert np.all(np.isnan(np.asarray(out)))
