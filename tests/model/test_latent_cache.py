"""Writing a step's latents into the paged cache against a loop over tokens in numpy."""

import jax.numpy as jnp
import numpy as np

from frontier_jax.model.latent_cache import NULL_BLOCK, Pages, empty_cache, write_latent

LAYERS, BLOCKS, P, WIDTH, ROPE = 2, 10, 4, 3, 2


def _chunk(starts, lengths, t, seed=0):
    """Rows b own blocks from a shuffled pool; row b's chunk covers positions starts[b] + [0, t)
    of which the first lengths[b] are real."""
    rng = np.random.default_rng(seed)
    rows = len(starts)
    owned = rng.permutation(np.arange(1, BLOCKS))
    per_row = (len(owned)) // rows
    table = np.full((rows, 4), NULL_BLOCK, np.int32)
    for b in range(rows):
        table[b, :per_row] = owned[b * per_row : (b + 1) * per_row]
    positions = np.asarray(starts)[:, None] + np.arange(t)
    write = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    c_kv = rng.standard_normal((rows, t, WIDTH)).astype(np.float32)
    k_rope = rng.standard_normal((rows, t, ROPE)).astype(np.float32)
    return table, positions, write, c_kv, k_rope


def _naive(table, positions, write, c_kv, k_rope, layer):
    """The cache after a loop over the real tokens (padding writes nothing)."""
    c = np.zeros((LAYERS, BLOCKS, P, WIDTH), np.float32)
    r = np.zeros((LAYERS, BLOCKS, P, ROPE), np.float32)
    for b in range(positions.shape[0]):
        for i, pos in enumerate(positions[b]):
            if write[b, i]:
                c[layer, table[b, pos // P], pos % P] = c_kv[b, i]
                r[layer, table[b, pos // P], pos % P] = k_rope[b, i]
    return c, r


def test_token_scatter_writes_real_tokens_and_drops_padding():
    table, positions, write, c_kv, k_rope = _chunk(starts=[0, 5], lengths=[6, 2], t=6)
    cache = write_latent(
        empty_cache(LAYERS, BLOCKS, P, WIDTH, ROPE, jnp.float32),
        1,
        jnp.asarray(c_kv),
        jnp.asarray(k_rope),
        jnp.asarray(positions),
        Pages(jnp.asarray(table), jnp.asarray(write)),
    )
    c, r = _naive(table, positions, write, c_kv, k_rope, layer=1)
    np.testing.assert_array_equal(np.asarray(cache.c_kv), c)  # padding left every other slot zero
    np.testing.assert_array_equal(np.asarray(cache.k_rope), r)
