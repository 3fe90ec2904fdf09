"""The Pallas grouped GEMM (interpreter on CPU) against a float64 loop over rows and groups."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.kernels import grouped_gemm
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


def _gather_problem(seed, sizes, tiles, sources, k, n, dtype):
    """x [S, K], W, dy [M, N] and a row map rows [M] with repeated sources, rows without one
    (index S) and sources read by no row, plus its inverse copies [S, C] (M = none)."""
    rng = np.random.default_rng(seed)
    m = tiles * TILE_ROWS
    rows = rng.integers(0, sources - 2, m)  # the last two sources are read by no row
    rows[rng.random(m) < 0.2] = sources  # no source: a zero row
    multiplicity = np.bincount(rows[rows < sources], minlength=sources)
    copies = np.full((sources, multiplicity.max()), m)
    for s in range(sources):
        found = np.flatnonzero(rows == s)
        copies[s, : len(found)] = found
    x = rng.standard_normal((sources, k)).astype(np.float32)
    w = rng.standard_normal((len(sizes), k, n)).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)  # nonzero on every row, tail included
    return (*(jnp.asarray(a, dtype) for a in (x, w, dy)), rows, copies)


def _gathered_reference(x, w, dy, sizes, rows):
    """float64 y[r] = x[rows[r]] W[g(r)] (zero without a source or a group), dx[s] = sum over
    the owned rows r reading s of dy[r] W[g(r)]^T, dW[g] = sum_r x[rows[r]]^T dy[r]."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    y, dx, dw = np.zeros((len(rows), w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    for r, g in enumerate(np.repeat(np.arange(len(sizes)), sizes)):
        if rows[r] < len(x):
            y[r] = x[rows[r]] @ w[g]
            dx[rows[r]] += w[g] @ dy[r]
            dw[g] += np.outer(x[rows[r]], dy[r])
    return y, dx, dw


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, 1e-2)])
def test_gathered_rows_match_gather_then_gemm_and_float64(dtype, tol):
    # the fused path (rows gathered in the kernels' loads) against float64 and against the XLA
    # gather followed by the sorted-rows kernel: relative Frobenius error < tol for y, dx and
    # dW; fused vs gather-then-GEMM within one bf16 rounding (the dx sums run in fp32 for the
    # fused path, in the operands' dtype through XLA's gather transpose)
    sizes = np.array([128, 0, 256, 128, 0])  # empty groups, and one unused tile at the end
    x, w, dy, rows, copies = _gather_problem(2, sizes, 5, 40, 64, 96, dtype)
    group_sizes = jnp.asarray(sizes)

    def fused(x, w):
        return tiled_grouped_matmul(
            x, w, group_sizes, lhs_rows=jnp.asarray(rows), lhs_copies=jnp.asarray(copies)
        )

    def gather_then_gemm(x, w):
        return tiled_grouped_matmul(
            jnp.take(x, jnp.asarray(rows), axis=0, mode="fill", fill_value=0), w, group_sizes
        )

    y, vjp = jax.vjp(fused, x, w)
    dx, dw = vjp(dy)
    y2, vjp2 = jax.vjp(gather_then_gemm, x, w)
    dx2, dw2 = vjp2(dy)
    refs = _gathered_reference(*(a.astype(jnp.float32) for a in (x, w, dy)), sizes, rows)
    assert y.dtype == dx.dtype == dw.dtype == dtype and dx.shape == x.shape
    for ours, xla, ref in zip((y, dx, dw), (y2, dx2, dw2), refs):
        assert _rel(ours, ref) < tol and _rel(xla, ref) < tol
        assert _rel(ours, np.asarray(xla, np.float64)) < tol
    assert not np.asarray(y[512:], np.float32).any()  # the unused tile is written as zeros
    assert not np.asarray(y[:512][rows[:512] == 40], np.float32).any()  # rows without a source
    assert not np.asarray(dx[38:], np.float32).any()  # sources no row reads
    assert not np.asarray(dw[1], np.float32).any() and not np.asarray(dw[4], np.float32).any()


# tiles small enough that the 48 x 64 problems span several blocks in every dimension
SMALL_TILES = Tilings(
    RowTiling(block_out=32, block_contract=16),
    RowTiling(32, 16),
    WeightTiling(16, 32, 32),
    weight_grad_gathered=WeightTiling(block_k=16, block_n=32, block_rows=32),
)


def test_gathered_rows_with_small_tiles_cover_several_blocks_per_dimension():
    sizes = np.array([256, 128])
    tilings = SMALL_TILES
    x, w, dy, rows, copies = _gather_problem(3, sizes, 3, 200, 48, 64, jnp.float32)
    y, vjp = jax.vjp(
        lambda x, w: tiled_grouped_matmul(
            x, w, jnp.asarray(sizes), tilings, lhs_rows=jnp.asarray(rows), lhs_copies=jnp.asarray(copies)
        ),
        x,
        w,
    )
    for ours, ref in zip((y, *vjp(dy)), _gathered_reference(x, w, dy, sizes, rows)):
        assert _rel(ours, ref) < FP32_TOL


def test_gathered_rows_need_their_inverse_and_a_whole_row_tile():
    x, w, sizes = jnp.zeros((10, 64)), jnp.zeros((2, 64, 64)), jnp.asarray([128, 0])
    with pytest.raises(ValueError, match="pass both"):
        tiled_grouped_matmul(x, w, sizes, lhs_rows=jnp.zeros((128,), jnp.int32))
    with pytest.raises(ValueError, match=r"S = 10 rows of x"):
        tiled_grouped_matmul(x, w, sizes, lhs_rows=jnp.zeros((128,), jnp.int32), lhs_copies=jnp.zeros((9, 2)))
    with pytest.raises(ValueError, match="100 rows are not a multiple"):
        tiled_grouped_matmul(
            x, w, sizes, lhs_rows=jnp.zeros((100,), jnp.int32), lhs_copies=jnp.zeros((10, 2))
        )


def _combine_problem(seed, sizes, tiles, tokens, copies, k, n, dtype):
    """x [M, K], W, a one-to-one map out_rows [M] of the grouped rows onto the T P combine rows
    (T = tokens, P = copies; padding rows, inside groups and past them, go nowhere: T P), the
    weights [T, P] and d_out [T, N]."""
    rng = np.random.default_rng(seed)
    m = tiles * TILE_ROWS
    grouped = np.flatnonzero(rng.random(int(np.sum(sizes))) < 0.8)[: tokens * copies]
    assert len(grouped) == tokens * copies, "the groups hold too few rows for the combine"
    out_rows = np.full(m, tokens * copies)
    out_rows[grouped] = rng.permutation(tokens * copies)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((len(sizes), k, n)).astype(np.float32)
    weights = rng.random((tokens, copies)).astype(np.float32)
    d_out = rng.standard_normal((tokens, n)).astype(np.float32)
    return (*(jnp.asarray(a, dtype) for a in (x, w)), out_rows, jnp.asarray(weights), jnp.asarray(d_out))


def _combined_reference(xs, w, sizes, out_rows, weights, d_out):
    """float64 out[t] = sum_p weights[t, p] z[t P + p] with z[out_rows[r]] = xs[r] W[g(r)], and
    the gradients: d_xs[r] = weights.flat[a] W[g(r)] d_out[a // P] (a = out_rows[r]),
    dW[g] = sum_r xs[r]^T weights.flat[a] d_out[a // P], d_weights[t, p] = <z[t P + p], d_out[t]>."""
    xs, w, weights, d_out = (np.asarray(a, np.float64) for a in (xs, w, weights, d_out))
    p = weights.shape[1]
    z, d_xs, dw = np.zeros((weights.size, w.shape[2])), np.zeros_like(xs), np.zeros_like(w)
    for r, g in enumerate(np.repeat(np.arange(len(sizes)), sizes)):
        a = out_rows[r]
        if a < weights.size:
            z[a] = xs[r] @ w[g]
            dy = weights.flat[a] * d_out[a // p]
            d_xs[r] = w[g] @ dy
            dw[g] += np.outer(xs[r], dy)
    out = np.einsum("tpn,tp->tn", z.reshape(*weights.shape, -1), weights)
    return out, d_xs, dw, np.einsum("tpn,tn->tp", z.reshape(*weights.shape, -1), d_out)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, 1e-2)])
def test_combined_rows_match_gemm_collect_combine_and_float64(dtype, tol):
    # the down GEMM storing its rows in combine order (the forward's scatter store, the backward's
    # gate-scaled gathered loads of d_out) against float64 and against the sorted-rows kernel
    # followed by XLA's collect gather and weighted sum: relative Frobenius error < tol for the
    # output and the gradients of x, W and the weights (bf16: the weights round to bf16 in both)
    sizes = np.array([256, 0, 128, 256, 0])  # empty groups, and one unused tile at the end
    x, w, out_rows, weights, d_out = _combine_problem(4, sizes, 6, 40, 3, 64, 96, dtype)
    group_sizes, rows = jnp.asarray(sizes), jnp.asarray(out_rows)

    def fused(x, w, weights):
        return tiled_grouped_matmul(x, w, group_sizes, out_rows=rows, out_weights=weights)

    def gemm_then_combine(x, w, weights):
        y = tiled_grouped_matmul(x, w, group_sizes)
        inverse = jnp.zeros(weights.size, jnp.int32).at[rows].set(jnp.arange(len(rows)), mode="drop")
        z = y[inverse].reshape(*weights.shape, -1)
        return jnp.einsum("tpn,tp->tn", z, weights.astype(dtype), preferred_element_type=jnp.float32)

    out, vjp = jax.vjp(fused, x, w, weights)
    grads = vjp(d_out)
    out2, vjp2 = jax.vjp(gemm_then_combine, x, w, weights)
    grads2 = vjp2(d_out)
    refs = _combined_reference(x.astype(jnp.float32), w.astype(jnp.float32), sizes, out_rows, weights, d_out)
    assert out.dtype == jnp.float32 and out.shape == (40, 96)
    assert grads[0].dtype == grads[1].dtype == dtype and grads[2].dtype == jnp.float32
    for ours, xla, ref in zip((out, *grads), (out2, *grads2), refs):
        assert _rel(ours, ref) < tol and _rel(xla, ref) < tol
        assert _rel(ours, np.asarray(xla, np.float64)) < tol
    padding = out_rows == 120  # rows going nowhere (inside groups, and the unused tile) get no gradient
    assert padding[:640].any() and not np.asarray(grads[0][padding], np.float32).any()
    assert not np.asarray(grads[1][1], np.float32).any() and not np.asarray(grads[1][4], np.float32).any()


def test_gathered_and_combined_rows_in_one_gemm_with_small_tiles():
    # both row maps on one GEMM (gathered lhs rows with repeated sources, combined output rows),
    # tiles small enough for several blocks per dimension: fp32 against float64
    sizes = np.array([256, 128])
    tilings = SMALL_TILES
    x, w, _, lhs_rows, copies = _gather_problem(5, sizes, 3, 50, 48, 64, jnp.float32)
    _, _, out_rows, weights, d_out = _combine_problem(6, sizes, 3, 60, 4, 48, 64, jnp.float32)

    def fused(x, w, weights):
        return tiled_grouped_matmul(
            x,
            w,
            jnp.asarray(sizes),
            tilings,
            lhs_rows=jnp.asarray(lhs_rows),
            lhs_copies=jnp.asarray(copies),
            out_rows=jnp.asarray(out_rows),
            out_weights=weights,
        )

    out, vjp = jax.vjp(fused, x, w, weights)
    dx, dw, d_weights = vjp(d_out)
    xs = np.where((lhs_rows < 50)[:, None], np.asarray(x)[np.minimum(lhs_rows, 49)], 0.0)
    ref_out, ref_dxs, ref_dw, ref_dweights = _combined_reference(xs, w, sizes, out_rows, weights, d_out)
    ref_dx = np.zeros((50, 48))
    np.add.at(ref_dx, lhs_rows[lhs_rows < 50], ref_dxs[lhs_rows < 50])
    for ours, ref in zip((out, dx, dw, d_weights), (ref_out, ref_dx, ref_dw, ref_dweights)):
        assert _rel(ours, ref) < FP32_TOL


def test_combined_rows_need_their_weights_and_one_target_per_row():
    x, w, sizes = jnp.zeros((128, 64)), jnp.zeros((2, 64, 64)), jnp.asarray([128, 0])
    with pytest.raises(ValueError, match="pass both"):
        tiled_grouped_matmul(x, w, sizes, out_rows=jnp.zeros((128,), jnp.int32))
    with pytest.raises(ValueError, match=r"\[M\] = \[128\] and \[T, P\]"):
        tiled_grouped_matmul(x, w, sizes, out_rows=jnp.zeros((64,), jnp.int32), out_weights=jnp.ones((8, 2)))


def test_every_kernel_variant_lowers_to_triton_for_a_gpu(monkeypatch):
    # the Pallas -> Triton lowering (not the interpreter) of the forward and both backward kernels
    # with sorted, gathered and combined rows, exported for CUDA on this CPU machine: a construct
    # the Triton lowering does not support (e.g. a gather or scatter it cannot index) fails here
    monkeypatch.setattr(grouped_gemm, "interpret", lambda: False)
    m, s, t, p, k, n = 384, 50, 40, 3, 64, 128
    sizes, i32 = jnp.asarray([128, 0, 256]), jnp.int32

    def grads(x, w, weights, lhs_rows, copies, out_rows, gathered, combined):
        def loss(x, w, weights):  # the value too, so the forward kernel stays in the program
            maps = dict(lhs_rows=lhs_rows, lhs_copies=copies) if gathered else {}
            maps |= dict(out_rows=out_rows, out_weights=weights) if combined else {}
            return jnp.sum(tiled_grouped_matmul(x, w, sizes, **maps))

        x = x if gathered else jnp.zeros((m, k), x.dtype)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, weights)

    shapes = [((s, k), jnp.bfloat16), ((3, k, n), jnp.bfloat16), ((t, p), jnp.float32)]
    shapes += [((m,), i32), ((s, 4), i32), ((m,), i32)]
    names = set()
    for gathered, combined in ((False, False), (True, False), (False, True), (True, True)):
        fn = jax.jit(lambda *a, g=gathered, c=combined: grads(*a, g, c))
        exported = jax.export.export(
            fn,
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes))
        names |= set(re.findall(r'name = "(grouped_gemm[a-z_]*)"', exported.mlir_module()))
    assert names == {
        "grouped_gemm_rows",
        "grouped_gemm_rows_t",
        "grouped_gemm_weight_grad",
        "grouped_gemm_rows_gathered",
        "grouped_gemm_weight_grad_gathered",
        "grouped_gemm_rows_scattered",
        "grouped_gemm_rows_t_gathered_scaled",
        "grouped_gemm_weight_grad_dy_gathered_scaled",
        "grouped_gemm_rows_gathered_scattered",
        "grouped_gemm_weight_grad_gathered_dy_gathered_scaled",
    }, names
