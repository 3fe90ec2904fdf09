"""Host-side bookkeeping of the paged latent cache: how many blocks, which are free, which
belong to which sequence (a block may be shared: reference counts, `BlockAllocator.share`).  The
device arrays and how steps read and write them are in `frontier_jax.model.latent_cache`.

Bytes per cached token: (L + D) (d_c + d_h^R) x itemsize, with L main-model layers and D MTP
modules (each has an attention layer with its own cache).  The pool has N blocks of P tokens,
block 0 reserved (the null block):
    N = 1 + max_seqs ceil((max_len + lookahead) / P)         by default, or
    N = floor(budget / (P x bytes per token))                with infer.memory_budget_gb > 0.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.infer.config import InferConfig
from frontier_jax.model.config import ModelConfig
from frontier_jax.model.latent_cache import NULL_BLOCK, LatentCache, ModelCache, empty_cache

DEFAULT_MAX_LEN = 2048  # infer.max_len=0: this, or the model's context if shorter


def cache_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    """(L + D) (d_c + d_h^R) x itemsize: the latent cache of one token over all layers."""
    return (
        (cfg.num_layers + cfg.mtp_depth)
        * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        * jnp.dtype(dtype).itemsize
    )


@dataclass(frozen=True)
class CacheLayout:
    """The pool's shape: num_blocks blocks (the null block included) of block_size tokens,
    sequences of at most max_len tokens plus `lookahead` positions that speculative
    verification writes past them (blocks_per_seq blocks)."""

    num_blocks: int
    block_size: int
    max_len: int
    lookahead: int = 0

    @property
    def blocks_per_seq(self) -> int:
        return math.ceil((self.max_len + self.lookahead) / self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @classmethod
    def plan(cls, cfg: ModelConfig, infer: InferConfig, dtype, lookahead: int = 0) -> "CacheLayout":
        max_len = infer.max_len or min(DEFAULT_MAX_LEN, cfg.max_position_embeddings)
        per_seq = math.ceil((max_len + lookahead) / infer.block_size)
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"infer.max_len={max_len} exceeds the model's context "
                f"(model.max_position_embeddings={cfg.max_position_embeddings}); lower it"
            )
        if infer.memory_budget_gb > 0:
            per_block = infer.block_size * cache_bytes_per_token(cfg, dtype)
            num_blocks = int(infer.memory_budget_gb * 2**30 // per_block)
            needed = 1 + per_seq
            if num_blocks < needed:
                raise ValueError(
                    f"infer.memory_budget_gb={infer.memory_budget_gb} holds {num_blocks} blocks "
                    f"of {per_block:,} B, fewer than one sequence of infer.max_len={max_len} "
                    f"needs ({needed}); raise the budget or lower infer.max_len"
                )
        else:
            num_blocks = 1 + infer.max_seqs * per_seq
        return cls(num_blocks, infer.block_size, max_len, lookahead)

    def bytes(self, cfg: ModelConfig, dtype) -> int:
        """The pool's device bytes, null block included: N P x `cache_bytes_per_token`."""
        return self.num_blocks * self.block_size * cache_bytes_per_token(cfg, dtype)

    def describe(self, cfg: ModelConfig, dtype) -> str:
        return (
            f"latent cache: {self.num_blocks - 1} blocks x {self.block_size} tokens = "
            f"{self.capacity_tokens:,} tokens ({(self.num_blocks - 1) // self.blocks_per_seq} sequences x "
            f"{self.max_len} context), {cache_bytes_per_token(cfg, dtype):,} B/token, "
            f"{self.bytes(cfg, dtype) / 2**30:.3f} GiB"
        )


def allocate_cache(cfg: ModelConfig, layout: CacheLayout, dtype) -> ModelCache:
    """Zero-filled device caches of the dense, MoE and MTP stacks."""

    def stack(num_layers: int) -> LatentCache | None:
        if not num_layers:
            return None
        return empty_cache(
            num_layers, layout.num_blocks, layout.block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype
        )

    return ModelCache(stack(cfg.first_k_dense), stack(cfg.num_moe_layers), stack(cfg.mtp_depth))


@functools.partial(jax.jit, donate_argnums=0)
def copy_blocks(cache: ModelCache, src: jax.Array, dst: jax.Array) -> ModelCache:
    """The cache with every layer's entries of blocks src [n] copied into blocks dst [n] (a
    forked sequence's own copy of a partly filled block), donated: updated in place."""

    def copy(values: jax.Array) -> jax.Array:
        return values.at[:, dst].set(values[:, src])

    return jax.tree.map(copy, cache)


def chain_keys(parent: bytes, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Prefix-cache keys of the full blocks of `tokens`, the block before them keyed `parent`
    (b"" at position 0): k_i = blake2b(k_{i-1} || int32 bytes of block i's tokens), so a key
    names every token from position 0 to the end of its block."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = np.asarray(tokens[start : start + block_size], "<i4").tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


class BlockAllocator:
    """Free blocks 1 .. N-1, each sequence's list of blocks and each block's reference count
    (the sequences whose list holds it).  A block is written only while one sequence holds it:
    forked samples and prefix-cache hits share full blocks and only read them (`share`,
    `adopt`).  A block whose last holder releases it is free.

    Prefix cache: a full block whose latents are final may be keyed (`register`, keys from
    `chain_keys`).  A keyed block stays keyed when freed: it waits in an LRU of evictable
    blocks, where a later sequence with the same prefix picks it up (`lookup`, `adopt`), until
    its space is needed; blocks are handed out from the unkeyed free blocks first, then from the
    least recently used evictable one, whose key is dropped (it is about to be rewritten).
    `tail`: with MTP drafting, the D tokens after a block on which its MTP latents depend (its
    last positions read them), None while those latents are not final.  `routing`: the experts
    [P, L_moe, K] each MoE layer routed the block's tokens to when its latents were computed, kept
    for a block keyed by a sequence that records its routing (`SamplingParams.record_routing`),
    so that a later recording sequence served from the block gets the routing its latents came
    from."""

    def __init__(self, layout: CacheLayout):
        self.layout = layout
        self._free = list(range(layout.num_blocks - 1, NULL_BLOCK, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # keyed, free; least recent first
        self._owned: dict[int, list[int]] = {}
        self._refs = np.zeros(layout.num_blocks, np.int32)
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._tail: dict[int, tuple[int, ...]] = {}
        self._routing: dict[int, np.ndarray] = {}

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds: unkeyed or evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        """Blocks held by at least one sequence (a shared block counts once)."""
        return self.layout.num_blocks - 1 - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Keyed blocks, held or evictable."""
        return len(self._key_of)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.layout.block_size)

    def can_hold(self, seq_id: int, num_tokens: int) -> bool:
        """Whether sequence `seq_id` can grow to num_tokens with the blocks now free."""
        return self.blocks_for(num_tokens) - len(self._owned.get(seq_id, ())) <= self.free_blocks

    def reserve(self, seq_id: int, num_tokens: int, shared: int = 0) -> list[int]:
        """Grows sequence seq_id's blocks to cover positions 0 .. num_tokens - 1, but for its
        first `shared` blocks, which it gets from another sequence later (`share`)."""
        owned = self._owned.setdefault(seq_id, [])
        missing = self.blocks_for(num_tokens) - shared - len(owned)
        if missing > self.free_blocks:
            raise RuntimeError(
                f"latent cache full: sequence {seq_id} needs {missing} more blocks, {self.free_blocks} free"
            )
        for _ in range(missing):
            owned.append(self._take())
            self._refs[owned[-1]] = 1
        return owned

    def _take(self) -> int:
        """A free block to be written: an unkeyed one, else the least recently used evictable
        one, unkeyed."""
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)
        self._unkey(block)
        return block

    def _unkey(self, block: int) -> None:
        del self._block_of[self._key_of.pop(block)]
        self._tail.pop(block, None)
        self._routing.pop(block, None)

    def share(self, parent: int, child: int, num_blocks: int) -> None:
        """Puts the first num_blocks blocks of `parent` in front of `child`'s own (each one's
        reference count + 1)."""
        shared = self._owned[parent][:num_blocks]
        self._owned[child] = shared + self._owned.get(child, [])
        self._refs[shared] += 1

    def lookup(
        self, keys: list[bytes], tails: list[tuple[int, ...]] | None = None, *, routed: bool = False
    ) -> list[int]:
        """The keyed blocks of the longest prefix of `keys` (block i keyed keys[i] and, with
        `tails`, its tail equal to tails[i]; with `routed`, its routing kept)."""
        found = []
        for i, key in enumerate(keys):
            block = self._block_of.get(key)
            if block is None or (tails is not None and self._tail.get(block) != tails[i]):
                break
            if routed and block not in self._routing:
                break
            found.append(block)
        return found

    def routing(self, blocks: list[int]) -> np.ndarray:
        """The kept routing of `blocks` (each keyed with one, `lookup(routed=True)`), in order:
        [len(blocks) P, L_moe, K] int32."""
        return np.concatenate([self._routing[block] for block in blocks])

    def evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` no sequence holds (adopting them takes them from the free ones)."""
        return sum(self._refs[b] == 0 for b in blocks)

    def adopt(self, seq_id: int, blocks: list[int]) -> None:
        """Starts sequence seq_id's (empty) list with the cached `blocks` (`lookup`), each
        one's reference count + 1: read, never written by it."""
        for block in blocks:
            self._evictable.pop(block, None)
        self._owned[seq_id] = list(blocks)
        self._refs[blocks] += 1

    def register(self, seq_id: int, keys: list[bytes], first: int = 0, tails=None, routing=None) -> None:
        """Keys the blocks first .. first + len(keys) - 1 of sequence seq_id (full, their
        latents final) with `keys`; with `tails` (MTP latents final too) their tails; with
        `routing` (a list of [P, L_moe, K] arrays or None, one per key) the routing of each.  A
        key that names another block already stays there, unless only this block has a tail or
        a routing."""
        owned = self._owned[seq_id]
        for i, key in enumerate(keys):
            block, tail = owned[first + i], None if tails is None else tails[i]
            routed = None if routing is None else routing[i]
            other = self._block_of.get(key)
            if other is not None and other != block:
                if (tail is None or other in self._tail) and (routed is None or other in self._routing):
                    continue
                self._unkey(other)
                if other in self._evictable:
                    del self._evictable[other]
                    self._free.append(other)
            self._block_of[key], self._key_of[block] = block, key
            if tail is not None:
                self._tail[block] = tail
            if routed is not None:
                self._routing[block] = routed

    def flush(self) -> None:
        """Drops every key (e.g. new weights: the cached latents are stale); evictable blocks
        become plain free blocks."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._block_of.clear()
        self._key_of.clear()
        self._tail.clear()
        self._routing.clear()

    def blocks(self, seq_id: int) -> list[int]:
        return self._owned.get(seq_id, [])

    def refs(self, block: int) -> int:
        return int(self._refs[block])

    def release(self, seq_id: int) -> None:
        """Drops sequence seq_id's hold on its blocks; a block nobody holds any more is free:
        evictable (most recently used, its sequence's last block first to go) when keyed."""
        owned = self._owned.pop(seq_id, [])
        self._refs[owned] -= 1
        for block in reversed(owned):
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def table(self, seq_ids: list[int | None], num_blocks: int) -> np.ndarray:
        """Block table [len(seq_ids), num_blocks] int32; None rows and unused entries: null block."""
        table = np.full((len(seq_ids), num_blocks), NULL_BLOCK, np.int32)
        for row, seq_id in enumerate(seq_ids):
            blocks = self._owned.get(seq_id, [])[:num_blocks] if seq_id is not None else []
            table[row, : len(blocks)] = blocks
        return table
