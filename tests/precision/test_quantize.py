"""Tile-wise fp8 quantization: scale shapes, round-trip error, saturation, zero and NaN tiles,
against the numpy reference."""

import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from frontier_jax.precision.quantize import pad_to_multiple, quantize
from frontier_jax.precision.recipe import E4M3, E5M2

from . import reference as ref

# format -> (dtype, max, half-ulp relative error of normal numbers, half spacing of subnormals)
FORMATS = {"e4m3": (E4M3, 448.0, 2.0**-4, 2.0**-10), "e5m2": (E5M2, 57344.0, 2.0**-3, 2.0**-17)}


def _data(shape, seed=0):
    """Normal data whose rows span magnitudes 1e-4 .. 1e4."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 4, (shape[0], 1))).astype(np.float32)


@pytest.mark.parametrize(
    "shape,tiles,scale_shape",
    [
        ((256, 384), (1, 128), (256, 3)),  # activations, 1 x 128 along K: [M, K / 128]
        ((256, 384), (128, 128), (2, 3)),  # weights, 128 x 128 blocks: [K / 128, N / 128]
        ((256, 384), (128, 1), (2, 384)),  # wgrad operands, 128 x 1 along tokens: [M / 128, K]
        ((256, 384), (None, None), (1, 1)),  # per tensor
        ((4, 256, 128), (1, 128, 128), (4, 2, 1)),  # stacked experts, blocks per expert
    ],
)
def test_scale_shapes(shape, tiles, scale_shape):
    q = quantize(jnp.ones(shape), E4M3, tiles)
    assert q.qvalue.shape == shape and q.qvalue.dtype == E4M3
    assert q.scale.shape == scale_shape and q.scale.dtype == jnp.float32


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("tiles", [(1, 128), (128, 128), (128, 1), (None, None)])
def test_round_trip_matches_reference_and_is_bounded_per_tile(fmt, tiles):
    dtype, _, rel, sub = FORMATS[fmt]
    x = _data((256, 256))
    q = quantize(jnp.asarray(x), dtype, tiles)
    got = np.asarray(qwix.dequantize(q), np.float64)
    want_q, want_s = ref.quantize(x, tiles, fmt)
    np.testing.assert_array_equal(np.asarray(q.qvalue.astype(jnp.float32)), want_q)
    np.testing.assert_allclose(got, want_q * want_s, rtol=2.0**-23)  # q s rounded to fp32
    # |x - q s| <= half an fp8 ulp: relative for normal values, absolute (x s) for subnormal ones
    bound = np.maximum(np.abs(x) * rel, sub * want_s)
    assert np.all(np.abs(got - x) <= bound * (1 + 1e-6))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_saturation_maps_each_tile_amax_to_the_format_max(fmt):
    dtype, fmax, rel, _ = FORMATS[fmt]
    x = _data((64, 512), seed=1)
    x[5, 200] = 3.0e38  # near the fp32 maximum: scale ~ 7e35, still exact in range
    q = quantize(jnp.asarray(x), dtype, (1, 128))
    qv = np.asarray(q.qvalue.astype(jnp.float32)).reshape(64, 4, 128)
    assert np.all(np.isfinite(qv))
    np.testing.assert_array_equal(np.abs(qv).max(-1), fmax)  # clipped at, never past, the max
    got = np.asarray(qwix.dequantize(q))
    np.testing.assert_allclose(got[5, 200], 3.0e38, rtol=rel)
    np.testing.assert_allclose(
        np.abs(got).reshape(64, 4, 128).max(-1), np.abs(x).reshape(64, 4, 128).max(-1), rtol=1e-6
    )


def test_all_zero_tile_gets_scale_one_and_zero_values():
    x = _data((4, 256))
    x[1, 128:] = 0.0
    q = quantize(jnp.asarray(x), E4M3, (1, 128))
    assert float(q.scale[1, 1]) == 1.0
    got = np.asarray(qwix.dequantize(q))
    assert np.all(got[1, 128:] == 0.0) and np.all(np.isfinite(got))


# (rows, tiles, x[2, 130]'s tile); from 64 rows on XLA:CPU's reduce_max drops NaN
NAN_TILES = [
    (4, (1, 128), np.s_[2, 128:]),
    (256, (1, 128), np.s_[2, 128:]),
    (256, (128, 128), np.s_[:128, 128:]),
    (256, (None, None), np.s_[:, :]),
]


@pytest.mark.parametrize("rows,tiles,tile", NAN_TILES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_a_tile_makes_that_tile_nan(bad, rows, tiles, tile):
    x = _data((rows, 256))
    x[2, 130] = bad
    q = quantize(jnp.asarray(x), E4M3, tiles)
    assert np.isnan(np.asarray(q.scale)).sum() == 1
    got = np.array(qwix.dequantize(q))
    assert np.all(np.isnan(got[tile]))
    got[tile] = 0.0
    assert np.all(np.isfinite(got))


def test_pad_to_multiple_pads_with_zeros_at_the_end():
    x = jnp.ones((3, 130))
    y = pad_to_multiple(x, (1, 128))
    assert y.shape == (3, 256) and float(y[:, 130:].sum()) == 0.0 and float(y[:, :130].sum()) == 390
    assert pad_to_multiple(x, (1, 1)) is x
