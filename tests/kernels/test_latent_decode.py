"""The paged latent decode kernel (Pallas interpreter on CPU) against a float64 loop over the
block table and against the XLA absorbed attention over the gathered cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.kernels.latent_decode import default_splits, paged_latent_attention
from frontier_jax.model.attention import latent_attention
from frontier_jax.model.latent_cache import LatentCache, read_latent

LAYERS, BLOCKS, P, WIDTH, ROPE = 2, 12, 16, 64, 16
SCALE = 0.3
# float32 bound: exact fp32 in the CPU interpreter; on a GPU Triton's fp32 dots run as TF32
# (10-bit mantissa; measured 1.9e-3 absolute on values of order 1 on an H200)
F32_TOL = 1e-5 if jax.default_backend() == "cpu" else 5e-3


def _problem(heads, rows=3, queries=2, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((LAYERS, BLOCKS, P, WIDTH)).astype(np.float32)
    kr = rng.standard_normal((LAYERS, BLOCKS, P, ROPE)).astype(np.float32)
    q = rng.standard_normal((rows, queries, heads, WIDTH)).astype(np.float32)
    qr = rng.standard_normal((rows, queries, heads, ROPE)).astype(np.float32)
    table = np.zeros((rows, 4), np.int32)  # 4 blocks per row at most; 0 = null block
    owned = rng.permutation(np.arange(1, BLOCKS))
    lengths = [1, P, 3 * P + 5][:rows]  # one token, exactly one block, a partial fourth block
    for r, n in enumerate(lengths):
        need = -(-n // P)
        table[r, :need], owned = owned[:need], owned[need:]
    # consecutive query positions ending at the row's last token (queries = MTP's verify window)
    positions = np.array([[max(n - queries + i, 0) for i in range(queries)] for n in lengths], np.int32)
    return c, kr, q, qr, table, positions


def _float64(c, kr, q, qr, table, positions, layer):
    out = np.zeros(q.shape, np.float64)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            keys = np.arange(positions[b, t] + 1)
            blocks = table[b, keys // P]
            ck = c[layer, blocks, keys % P].astype(np.float64)  # [S, d_c]
            rk = kr[layer, blocks, keys % P].astype(np.float64)
            s = SCALE * (q[b, t].astype(np.float64) @ ck.T + qr[b, t].astype(np.float64) @ rk.T)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, t] = (p / p.sum(axis=1, keepdims=True)) @ ck
    return out


@pytest.mark.parametrize("heads", [16, 4])  # 4: padded to Triton's 16
@pytest.mark.parametrize("splits", [1, 3, None])
def test_kernel_matches_float64_loop(heads, splits):
    c, kr, q, qr, table, positions = _problem(heads)
    for layer in range(LAYERS):
        got = paged_latent_attention(
            *map(jnp.asarray, (q, qr, c, kr)),
            jnp.int32(layer),
            jnp.asarray(table),
            jnp.asarray(positions),
            scale=SCALE,
            splits=splits,
        )
        assert got.shape == q.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(got), _float64(c, kr, q, qr, table, positions, layer), rtol=F32_TOL, atol=F32_TOL
        )


def test_kernel_matches_the_xla_path_over_the_gathered_cache_in_bfloat16():
    c, kr, q, qr, table, positions = _problem(16, seed=1)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    cache = LatentCache(bf(c), bf(kr))
    c_rows, kr_rows = read_latent(cache, 1, jnp.asarray(table))
    want = latent_attention(bf(q), bf(qr), c_rows, kr_rows, scale=SCALE, positions=jnp.asarray(positions))
    got = paged_latent_attention(
        bf(q),
        bf(qr),
        cache.c_kv,
        cache.k_rope,
        jnp.int32(1),
        jnp.asarray(table),
        jnp.asarray(positions),
        scale=SCALE,
    )
    assert got.dtype == jnp.bfloat16
    # the kernel rounds the softmax weights to bf16 before the weighted sum: ~2^-8 relative
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2
    )


def test_blocks_past_a_rows_length_are_never_read():
    """NaN in every block no row owns (the null block included, which backs the unused table
    entries) must not reach any output: the kernel walks only the blocks up to each position."""
    c, kr, q, qr, table, positions = _problem(16)
    poisoned_c, poisoned_kr = c.copy(), kr.copy()
    owned = set(table[table > 0].tolist())
    for blk in range(BLOCKS):
        if blk not in owned:
            poisoned_c[:, blk], poisoned_kr[:, blk] = np.nan, np.nan
    got = paged_latent_attention(
        *map(jnp.asarray, (q, qr, poisoned_c, poisoned_kr)),
        jnp.int32(0),
        jnp.asarray(table),
        jnp.asarray(positions),
        scale=SCALE,
        splits=2,
    )
    np.testing.assert_allclose(
        np.asarray(got), _float64(c, kr, q, qr, table, positions, 0), rtol=F32_TOL, atol=F32_TOL
    )


def test_default_splits_fill_about_128_programs():
    assert default_splits(rows=1, max_blocks=64) == 64
    assert default_splits(rows=1, max_blocks=1000) == 128
    assert default_splits(rows=32, max_blocks=64) == 4
    assert default_splits(rows=256, max_blocks=64) == 1
