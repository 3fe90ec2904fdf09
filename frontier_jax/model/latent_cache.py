"""The paged latent KV cache as device arrays, and how a step writes and reads it.

MLA caches per token and layer only c^KV [d_c] and k^R [d_h^R] (`mla.py`).  They live in a
pool of fixed-size blocks of P tokens shared by all sequences:
    c_kv   [L, N_blocks, P, d_c]        k_rope [L, N_blocks, P, d_h^R]
A sequence owns a list of blocks, its row of the block table [B, M]: its token at position p
sits in block table[b, p // P] at offset p % P, so positions 0 .. M P - 1 are addressable.
Block 0 is the null block: it backs unused table entries, so that one program serves rows of
different lengths; the writes of padding tokens are dropped.  Allocating blocks (free list,
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
    layer `layer`, one token row at a time: token (b, t) goes to block
    block_table[b, positions // P] at offset positions % P.  Tokens with pages.write False get
    an out-of-range block index of their own and are dropped, so every index of the scatter is
    unique (XLA then writes the rows in parallel, without ordering duplicates)."""
    p, n_blocks = cache.block_size, cache.c_kv.shape[1]
    slot = jnp.clip(positions // p, 0, pages.block_table.shape[1] - 1)
    block = jnp.take_along_axis(pages.block_table, slot, axis=1)
    dropped = n_blocks + jnp.arange(block.size, dtype=block.dtype).reshape(block.shape)
    block = jnp.where(pages.write, block, dropped)
    offset = positions % p
    return LatentCache(
        _store(cache.c_kv, (layer, block, offset), c_kv),
        _store(cache.k_rope, (layer, block, offset), k_rope),
    )


def _store(values: jax.Array, index: tuple, rows: jax.Array) -> jax.Array:
    """values.at[index].set(rows) for unique, possibly out-of-range (dropped) indices."""
    return values.at[index].set(rows.astype(values.dtype), mode="drop", unique_indices=True)


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
