"""Prefill and decode over the paged latent cache give the full-sequence forward's logits.

Rows of different lengths go through chunked prefill (expanded MLA; chunk sizes that do not
divide the prompts) and then one token per step through absorbed-MLA decode, with blocks
small enough that every row crosses block boundaries.  Reference: the model's full-sequence
forward without cache (causal, so rows padded at the end keep their logits), fp32."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.infer.cache import BlockAllocator, CacheLayout, allocate_cache
from frontier_jax.infer.config import InferConfig
from frontier_jax.infer.step import make_step
from frontier_jax.model import Transformer
from frontier_jax.model import mla as mla_module
from frontier_jax.model.config import AttentionImpl, ImplConfig
from frontier_jax.model.latent_cache import Pages
from tests.model import common

LENGTHS = (13, 5, 10)  # prompt lengths of one batch
BLOCK = 4
REL = 1e-5


def rel_err(value, ref) -> float:
    return float(np.abs(np.asarray(value, np.float64) - ref).max() / np.abs(ref).max())


def run_cached(model, ids: np.ndarray, prefill_lengths, chunk: int, impl: str = "xla") -> list[np.ndarray]:
    """Logits [n_b, vocab] of every position of each row: positions < prefill_lengths[b] by
    prefill chunks of `chunk` tokens (all positions' logits), the rest one decode step each."""
    cfg = model.cfg
    layout = CacheLayout.plan(
        cfg, InferConfig(block_size=BLOCK, max_seqs=len(LENGTHS), max_len=16), jnp.float32
    )
    alloc = BlockAllocator(layout)
    cache = allocate_cache(cfg, layout, jnp.float32)
    graphdef, state = nnx.split(model)
    prefill, decode = make_step(graphdef, absorbed=False), make_step(graphdef, absorbed=True, impl=impl)
    out = [[] for _ in LENGTHS]
    rows = range(len(LENGTHS))

    def run(step, starts, counts, width):
        nonlocal cache
        for b in rows:
            alloc.reserve(b, starts[b] + counts[b])
        pos = np.array([[s + t for t in range(width)] for s in starts], np.int32)
        write = np.arange(width)[None, :] < np.array(counts)[:, None]
        tok = np.where(write, np.take_along_axis(ids, np.minimum(pos, ids.shape[1] - 1), 1), 0)
        pages = Pages(jnp.asarray(alloc.table(list(rows), layout.blocks_per_seq)), jnp.asarray(write))
        select = jnp.broadcast_to(jnp.arange(width), (len(LENGTHS), width))
        logits, _, cache, _ = step(state, cache, jnp.asarray(tok), jnp.asarray(pos), pages, select)
        for b in rows:
            out[b].extend(np.asarray(logits[b, : counts[b]]))

    done = [0] * len(LENGTHS)
    while any(d < p for d, p in zip(done, prefill_lengths)):
        counts = [min(chunk, p - d) for d, p in zip(done, prefill_lengths)]
        run(prefill, list(done), counts, chunk)
        done = [d + c for d, c in zip(done, counts)]
    while any(d < n for d, n in zip(done, LENGTHS)):
        counts = [int(d < n) for d, n in zip(done, LENGTHS)]
        run(decode, list(done), counts, 1)
        done = [d + c for d, c in zip(done, counts)]
    return [np.stack(rows_logits) for rows_logits in out]


@pytest.mark.parametrize(
    "q_lora_rank,impl", [(16, "xla"), (0, "xla"), (16, "pallas")], ids=["q_lora", "full_rank_q", "pallas"]
)
def test_prefill_and_decode_logits_equal_full_forward(q_lora_rank, impl):
    """impl: the decode attention core (`infer.decode_attention_impl`)."""
    cfg = common.tiny_config(q_lora_rank=q_lora_rank)  # YaRN on (TINY_YARN)
    model = common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=3)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (len(LENGTHS), max(LENGTHS))).astype(np.int32)
    reference = np.asarray(common.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), np.float64)
    prefill_lengths = (7, 2, 10)  # rows 0 and 1 then decode; chunk 3 divides none of 7, 2, 10
    cached = run_cached(model, ids, prefill_lengths, chunk=3, impl=impl)
    for b, n in enumerate(LENGTHS):
        assert cached[b].shape == (n, cfg.vocab_size)
        for t in range(n):
            path = "prefill" if t < prefill_lengths[b] else "decode"
            err = rel_err(cached[b][t], reference[b, t])
            assert err < REL, f"row {b} position {t} ({path}): rel err {err:.2e}"


def test_cudnn_prefill_attends_in_two_parts_and_equals_the_full_forward(monkeypatch):
    """`impl.attention=cudnn` prefills by `chunk_attention` (the chunk over its cached prefix and
    over itself, merged by log-sum-exp).  cuDNN runs on GPUs only, so its calls go to
    jax.nn.dot_product_attention's XLA implementation here: this checks the wiring (the chunk's
    own latent, the prefix read from the cache, each row's offset and real-token count) on
    chunks that start mid-row, rows with no prefix and padded rows."""
    real = mla_module.chunk_attention
    calls = []

    def on_xla(*args, **kwargs):
        calls.append(kwargs["implementation"])
        return real(*args, **{**kwargs, "implementation": "xla"})

    monkeypatch.setattr(mla_module, "chunk_attention", on_xla)
    cfg = common.tiny_config(q_lora_rank=16)
    model = common.build(
        lambda: Transformer(cfg, impl=ImplConfig(attention=AttentionImpl.cudnn), rngs=nnx.Rngs(0)), seed=3
    )
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (len(LENGTHS), max(LENGTHS))).astype(np.int32)
    on_xla_attention = common.copy_state(model, common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    reference = np.asarray(common.jit(lambda m, x: m(x))(on_xla_attention, jnp.asarray(ids)), np.float64)
    cached = run_cached(model, ids, (7, 2, 10), chunk=3)
    assert calls and set(calls) == {"cudnn"}
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            err = rel_err(cached[b][t], reference[b, t])
            assert err < REL, f"row {b} position {t}: rel err {err:.2e}"
