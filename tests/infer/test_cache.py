"""The paged latent cache: its size per token (shapes only), the block allocator and the
smallest memory budget."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from frontier_jax.config import load_config
from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.infer.cache import BlockAllocator, CacheLayout, allocate_cache, cache_bytes_per_token
from frontier_jax.infer.config import InferConfig
from frontier_jax.model import Transformer
from frontier_jax.model.latent_cache import NULL_BLOCK
from tests.model import common


def test_deepseek_v3_cache_holds_576_values_per_token_per_layer():
    cfg = load_config("model/deepseek-v3-671b").model
    infer = InferConfig(max_seqs=2, max_len=4096)
    layout = CacheLayout.plan(cfg, infer, jnp.bfloat16)
    cache = jax.eval_shape(lambda: allocate_cache(cfg, layout, jnp.bfloat16))
    values = sum(leaf.size for leaf in jax.tree.leaves(cache))
    token_slots = layout.num_blocks * layout.block_size
    layers = cfg.num_layers + cfg.mtp_depth  # 61 main layers + 1 MTP module
    assert values == token_slots * layers * 576
    assert cache_bytes_per_token(cfg.replace(mtp_depth=0), jnp.bfloat16) == 70_272  # what `describe` prints


def test_allocator_frees_blocks_of_retired_sequences():
    layout = CacheLayout(num_blocks=5, block_size=4, max_len=16)
    alloc = BlockAllocator(layout)
    assert alloc.reserve(0, 9) == alloc.table([0], 3)[0].tolist() and len(alloc.reserve(0, 9)) == 3
    assert not alloc.can_hold(1, 5) and alloc.can_hold(1, 4)
    with pytest.raises(RuntimeError, match="latent cache full"):
        alloc.reserve(1, 8)
    alloc.release(0)
    assert alloc.free_blocks == 4 and NULL_BLOCK not in alloc.reserve(1, 16)


def test_budget_smaller_than_one_sequence_is_rejected():
    cfg = load_config("model/deepseek-v3-671b").model
    with pytest.raises(ValueError, match="infer.memory_budget_gb"):
        CacheLayout.plan(cfg, InferConfig(max_len=4096, memory_budget_gb=0.01), jnp.bfloat16)


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "mtp"])
def test_the_smallest_budget_admits_a_max_length_request(speculative):
    """infer.memory_budget_gb for exactly 1 + ceil((max_len + lookahead) / P) blocks, the null
    block and one whole sequence, is accepted and admits a request that fills infer.max_len;
    one block fewer holds no such request (it would wait for ever) and is rejected."""
    cfg = common.tiny_config(mtp_depth=2)
    infer = InferConfig(block_size=8, max_seqs=2, max_len=40, speculative="mtp" if speculative else "none")
    lookahead = cfg.mtp_depth if speculative else 0
    per_seq = -(-(infer.max_len + lookahead) // infer.block_size)
    per_block = infer.block_size * cache_bytes_per_token(cfg, jnp.float32)

    def budget(blocks: int) -> InferConfig:
        return dataclasses.replace(infer, memory_budget_gb=(blocks + 0.5) * per_block / 2**30)

    model = common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    engine = Engine(model, infer=budget(1 + per_seq))
    assert engine.layout.num_blocks == 1 + per_seq and engine.layout.lookahead == lookahead
    engine.submit([1] * 10, SamplingParams(max_new_tokens=infer.max_len))  # budget: max_len tokens
    engine.scheduler.admit()
    assert len(engine.scheduler.running) == 1 and not engine.scheduler.waiting
    with pytest.raises(ValueError, match=rf"holds {per_seq} blocks .* needs \({1 + per_seq}\)"):
        CacheLayout.plan(cfg, budget(per_seq), jnp.float32, lookahead)
