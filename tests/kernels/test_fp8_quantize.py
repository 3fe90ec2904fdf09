"""The fused two-axis fp8 quantization kernel (Pallas interpret mode on CPU) against
`precision.quantize.quantize`: the same values bit for bit (NaN payloads aside), zero tiles
(scale 1), NaN / inf surfacing, and the projections' gradients through it (`gemm.use_kernel`
forced on) equal to the XLA quantization path's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.kernels.fp8_quantize import quantize_rows_cols
from frontier_jax.precision import FP8_DEEPSEEK, gemm
from frontier_jax.precision import quantize_activation as qa
from frontier_jax.precision.fp8_grouped import fp8_grouped_matmul
from frontier_jax.precision.fp8_linear import fp8_matmul
from frontier_jax.precision.quantize import quantize
from frontier_jax.precision.recipe import E4M3, E5M2


def _same(a, b):
    np.testing.assert_array_equal(
        np.asarray(a.qvalue.astype(jnp.float32)), np.asarray(b.qvalue.astype(jnp.float32))
    )
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


@pytest.mark.parametrize("qtype", [E4M3, E5M2])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_matches_quantize(qtype, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 384)) * 10.0 ** rng.uniform(-3, 3, (256, 1))
    x[:128, 128:256] = 0.0  # an all-zero tile: scale 1, zeros
    x = jnp.asarray(x, dtype)
    rows, cols = quantize_rows_cols(x, qtype)
    _same(rows, quantize(x, qtype, (1, 128)))
    _same(cols, quantize(x, qtype, (128, 1)).T)
    assert float(rows.scale[0, 1]) == 1.0 and float(cols.scale[128, 0]) == 1.0
    only_rows, none = quantize_rows_cols(x, qtype, cols=False)
    assert none is None
    _same(only_rows, rows)


def test_nan_and_inf_surface():
    x = jnp.ones((128, 256), jnp.float32).at[3, 5].set(jnp.nan).at[7, 200].set(jnp.inf)
    rows, cols = quantize_rows_cols(x, E4M3)
    for q in (rows, cols):
        values = np.asarray(q.qvalue.astype(jnp.float32)) * np.repeat(np.asarray(q.scale), 128, 1)
        assert np.isnan(values).any()
    deq_rows = np.asarray(rows.qvalue.astype(jnp.float32)) * np.repeat(np.asarray(rows.scale), 128, 1)
    assert not np.isfinite(deq_rows[3, :128]).all() and not np.isfinite(deq_rows[7, 128:]).all()
    assert np.isfinite(deq_rows[4]).all()
    assert np.isnan(np.asarray(rows.scale)[3, 0]) or np.isnan(deq_rows[3, :128]).all()


def test_bad_shape_is_named():
    with pytest.raises(ValueError, match=r"x \(200, 256\) must be \[M, K\] with M, K multiples"):
        quantize_rows_cols(jnp.zeros((200, 256)), E4M3)


def test_projection_gradients_equal_xla_quantization(monkeypatch):
    """fp8 projection and grouped experts: the fused quantization (kernel path) gives the same
    outputs and gradients as the XLA quantization feeding the same kernels' reference."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((200, 256)), jnp.float32)  # rows padded inside
    w = jnp.asarray(rng.standard_normal((256, 384)) * 0.05, jnp.float32)
    sizes = jnp.array([128, 0, 256], jnp.int32)
    xg = jnp.asarray(rng.standard_normal((384, 256)), jnp.float32)
    wg = jnp.asarray(rng.standard_normal((3, 256, 128)) * 0.05, jnp.float32)

    def losses():
        dense = jax.value_and_grad(lambda x, w: jnp.sum(fp8_matmul(x, w, FP8_DEEPSEEK) ** 2), argnums=(0, 1))(
            x, w
        )
        grouped = jax.value_and_grad(
            lambda x, w: jnp.sum(fp8_grouped_matmul(x, w, sizes, FP8_DEEPSEEK) ** 2), argnums=(0, 1)
        )(xg, wg)
        return dense, grouped

    monkeypatch.setattr(gemm, "use_kernel", lambda: True)
    fused = losses()
    calls = []
    monkeypatch.setattr(
        qa, "quantize_rows_cols", lambda *a, **k: calls.append(1) or quantize_rows_cols(*a, **k)
    )
    assert losses() and calls  # the kernel path is the one taken
    monkeypatch.setattr(qa, "BLOCK", -1)  # recipe.block != BLOCK: the XLA quantization
    reference = losses()
    for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
