"""The Mosaic GPU blockwise fp8 GEMM (`kernels/fp8_gemm_mgpu.py`).

Without a GPU: the kernel's whole Mosaic GPU lowering for "cuda" (layouts, shared-memory
transforms, wgmma operand checks) for both column-scale forms, the scale preparation against
a float64 loop, and the shape / scale errors.  On a Hopper GPU additionally the numerics
against the XLA reference of `precision.gemm` on the same quantized operands (run with
`JAX_PLATFORMS=cuda python -m pytest tests/kernels/test_fp8_gemm_mgpu.py`: conftest defaults
to CPU); `benchmarks/fp8_gemm.py` repeats that check at the benchmarked sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.kernels import fp8_gemm_mgpu as mgpu
from frontier_jax.precision import gemm
from frontier_jax.precision.quantize import quantize
from frontier_jax.precision.recipe import E4M3

F8 = jnp.float8_e4m3fn


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("m,n,k,col_blocks", [(256, 768, 384, True), (128, 256, 256, False)])
def test_lowers_for_cuda(m, n, k, col_blocks):
    sb_cols = n // 128 if col_blocks else n
    fn = jax.jit(
        lambda a, b, sa, sb: mgpu.fp8_matmul_nt_mgpu(a, b, sa, sb, num_sms=132, out_dtype=jnp.bfloat16)
    )
    lowered = fn.trace(
        _spec((m, k), F8), _spec((n, k), F8), _spec((k // 128, m)), _spec((k // 128, sb_cols))
    ).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "mosaic_gpu" in text and f"{m}x{n}xbf16" in text


def test_grouped_lowers_for_cuda():
    m, g, n, k = 512, 3, 768, 384
    fn = jax.jit(lambda *x: mgpu.fp8_grouped_rows_nt_mgpu(*x, num_sms=132))
    text = (
        fn.trace(
            _spec((m, k), F8),
            _spec((g, n, k), F8),
            _spec((k // 128, m)),
            _spec((g, k // 128, n // 128)),
            _spec((m // 128,), jnp.int32),
        )
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "mosaic_gpu" in text and f"{m}x{n}xf32" in text


def test_chunk_scales_match_loop():
    rng = np.random.default_rng(0)
    m, n, k = 256, 384, 512
    a_scale = rng.uniform(0.5, 2, (m, k // 256)).astype(np.float32)  # 1 x 256 blocks
    for b_rows, blocks in ((n // 128, True), (n, False), (1, True)):
        b_scale = rng.uniform(0.5, 2, (b_rows, k // 128)).astype(np.float32)
        sa, sb = mgpu.chunk_scales(jnp.asarray(a_scale), jnp.asarray(b_scale), m, n, k)
        want_a = np.array([[a_scale[r, c * 128 // 256] for r in range(m)] for c in range(k // 128)])
        cols = n // 128 if blocks else n
        want_b = np.array(
            [[b_scale[j * (n // cols) // (n // b_rows), c] for j in range(cols)] for c in range(k // 128)]
        )
        np.testing.assert_array_equal(np.asarray(sa), want_a)
        np.testing.assert_array_equal(np.asarray(sb), want_b)


def test_bad_shapes_and_scales_are_named():
    a, b = jnp.zeros((256, 384), F8), jnp.zeros((256, 384), F8)
    sa, sb = jnp.ones((3, 256)), jnp.ones((3, 256))
    with pytest.raises(ValueError, match=r"M 200 must be a multiple of 128"):
        mgpu.fp8_matmul_nt_mgpu(a[:200], b, sa[:, :200], sb)
    with pytest.raises(ValueError, match=r"scales \(3, 256\), \(2, 256\) are not"):
        mgpu.fp8_matmul_nt_mgpu(a, b, sa, sb[:2])
    with pytest.raises(ValueError, match="share the contraction width and dtype"):
        mgpu.fp8_matmul_nt_mgpu(a, b.astype(jnp.float8_e5m2), sa, sb)
    with pytest.raises(ValueError, match="block column scales need tile_n 128"):
        mgpu.fp8_matmul_nt_mgpu(a, b, sa, sb[:, :2], tiling=mgpu.MgpuTiling(tile_n=256))
    with pytest.raises(ValueError, match=r"tile_group \(3,\) are not"):
        mgpu.fp8_grouped_rows_nt_mgpu(
            a, jnp.zeros((2, 256, 384), F8), sa, jnp.ones((2, 3, 2)), jnp.zeros((3,), jnp.int32)
        )
    with pytest.raises(ValueError, match="along K = 384 are not multiples of 128"):
        mgpu.chunk_scales(jnp.ones((256, 6)), jnp.ones((2, 3)), 256, 256, 384)


@pytest.mark.skipif(not mgpu.is_hopper(), reason="the kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("m,n,k", [(1024, 1024, 1024), (256, 768, 384), (384, 640, 256)])
@pytest.mark.parametrize("b_tiles", [(128, 128), (1, 128)])
def test_matches_xla_reference_on_hopper(m, n, k, b_tiles):
    rng = np.random.default_rng(1)
    a = quantize(jnp.asarray(rng.standard_normal((m, k)), jnp.float32), E4M3, (1, 128))
    b = quantize(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), E4M3, b_tiles)
    sa, sb = mgpu.chunk_scales(a.scale, b.scale, m, n, k)
    got = np.asarray(mgpu.fp8_matmul_nt_mgpu(a.qvalue, b.qvalue, sa, sb), np.float64)
    want = np.asarray(gemm._xla_scaled_matmul(a, b), np.float64)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.skipif(not mgpu.is_hopper(), reason="the kernel runs on Hopper GPUs only")
def test_grouped_matches_xla_reference_on_hopper():
    """Groups of 256, 0 and 128 rows, then two unused tiles (zeros)."""
    rng = np.random.default_rng(2)
    sizes, m, g, n, k = jnp.array([256, 0, 128], jnp.int32), 640, 3, 384, 256
    a = quantize(jnp.asarray(rng.standard_normal((m, k)), jnp.float32), E4M3, (1, 128))
    w = quantize(jnp.asarray(rng.standard_normal((g, n, k)), jnp.float32), E4M3, (1, 128, 128))
    tile_group = gemm.row_groups(sizes // 128, m // 128)
    sa, sw = mgpu.chunk_scales(a.scale, w.scale, m, n, k)
    assert sw.shape == (g, k // 128, n // 128)
    got = np.asarray(mgpu.fp8_grouped_rows_nt_mgpu(a.qvalue, w.qvalue, sa, sw, tile_group), np.float64)
    want = np.asarray(gemm._xla_scaled_grouped_matmul(a, w, sizes), np.float64)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert not got[384:].any()
