"""The paged latent KV cache as device arrays, and how a step writes and reads it.

MLA caches per token and layer only c^KV [d_c] and k^R [d_h^R] (`mla.py`).  They live in a
pool of fixed-size blocks of P tokens shared by all sequences:
    c_kv   [L, N_blocks, P, d_c]        k_rope [L, N_blocks, P, d_h^R]
A sequence owns a list of blocks, its row of the block table [B, M]: its token at position p
sits in block table[b, p // P] at offset p % P, so positions 0 .. M P - 1 are addressable.
Block 0 is the null block: it backs unused table entries and absorbs the writes of padding
tokens, so that one program serves rows of different lengths.  Allocating blocks (free list,
block tables) is host-side bookkeeping (`frontier_jax.infer.cache`); this module only moves
values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NULL_BLOCK = 0


class LatentCache(NamedTuple):
    """One stack of layers' cache: c_kv [L, N_blocks, P, d_c], k_rope [L, N_blocks, P, d_h^R]."""

    c_kv: jax.Array
    k_rope: jax.Array

    @property
    def block_size(self) -> int:
        return self.c_kv.shape[2]


class ModelCache(NamedTuple):
    """The caches of a Transformer's three stacks of attention layers (None where a stack is
    absent): the dense prefix, the MoE layers and the MTP modules."""

    dense: LatentCache | None
    moe: LatentCache | None
    mtp: LatentCache | None


class Pages(NamedTuple):
    """Where a step's tokens live: block_table [B, M] int32 (block ids, NULL_BLOCK where
    unused) and write [B, T] bool (True for the real tokens, whose latent the step stores)."""

    block_table: jax.Array
    write: jax.Array


def write_latent(
    cache: LatentCache, layer, c_kv: jax.Array, k_rope: jax.Array, positions: jax.Array, pages: Pages
) -> LatentCache:
    """Stores c_kv [B, T, d_c] and k_rope [B, T, d_h^R] of tokens at `positions` [B, T] into
    layer `layer`; tokens with pages.write False go to the null block."""
    p = cache.block_size
    slot = jnp.clip(positions // p, 0, pages.block_table.shape[1] - 1)
    block = jnp.take_along_axis(pages.block_table, slot, axis=1)
    block = jnp.where(pages.write, block, NULL_BLOCK)
    offset = jnp.where(pages.write, positions % p, 0)
    return LatentCache(
        cache.c_kv.at[layer, block, offset].set(c_kv.astype(cache.c_kv.dtype)),
        cache.k_rope.at[layer, block, offset].set(k_rope.astype(cache.k_rope.dtype)),
    )


def read_latent(cache: LatentCache, layer, block_table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s latent of every addressable position of each row, in position order:
    (c_kv [B, M P, d_c], k_rope [B, M P, d_h^R]); entries past a row's length are arbitrary
    and must be masked by the reader (key position <= query position)."""
    b, m = block_table.shape

    def gather(values):
        blocks = values[layer][block_table]  # [B, M, P, d]
        return blocks.reshape(b, m * blocks.shape[2], blocks.shape[3])

    return gather(cache.c_kv), gather(cache.k_rope)


def empty_cache(
    num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int, dtype
) -> LatentCache:
    """A zero-filled cache of one stack of layers."""
    return LatentCache(
        jnp.zeros((num_layers, num_blocks, block_size, kv_lora_rank), dtype),
        jnp.zeros((num_layers, num_blocks, block_size, rope_dim), dtype),
    )
