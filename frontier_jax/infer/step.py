"""The pure, jitted model steps of the engine: T new tokens per row through the model over
the paged latent cache (donated, so it is updated in place), logits at chosen positions.

    step(state, cache, ids [B, T], positions [B, T], pages, select [B, K])
        -> (logits [B, K, vocab] fp32, final-normed hidden g [B, K, d], cache,
            routed experts [L_moe, B, T, K_r] or None)

Prefill chunks take the expanded MLA path, decode steps the absorbed one (`MLA.extend`).  jax.jit
compiles once per shape; the engine pads B, T and the block table's width to a few buckets so
that a handful of programs serve every request mix.

Plain decoding runs one program per step that also picks its input tokens and samples:

    decode(state, cache, previous [R], packed [B, 9 + S + M])
        -> (tokens [R], logprobs [B], top ids [B, k], top log-probs [B, k],
            tempered log-probs [B] or None, cache, routed experts [L_moe, B, 1, K_r] or None)

row b's input token is previous[source_b] (the token the previous step sampled for that request,
still on the device) when source_b >= 0, else the host's token_b; `packed` holds every per-row
host input in one int32 array (`pack_decode`: one transfer per step), floats and seeds by their
bits, then S = MAX_BANNED ids the row may not pick (min_tokens; -1: none); the top
ids and log-probs are the k = MAX_LOGPROBS most likely tokens (`sampling.top_logprobs`), the
tempered log-probs log softmax(z / temperature)[token] (`sampling.tempered_logprobs`; only the
program made with tempered=True computes them, the one steps run when a row asks); tokens come back padded to R rows (R = the most rows of a step), so that they can feed the
next step whatever its bucket.  The routed experts stay on the device: the engine counts the
real rows' expert loads from them (`expert_load.count_experts`) and reads them back for the
rows that record their routing (`SamplingParams.record_routing`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frontier_jax.infer.sampling import MAX_BANNED, SamplingParams, sample, tempered_logprobs, top_logprobs
from frontier_jax.model.extend_context import ExtendContext
from frontier_jax.model.latent_cache import Pages

# columns of the packed decode inputs, then the block table
TOKEN, SOURCE, POSITION, WRITE, SEED, COUNTER, TOP_K, TEMPERATURE, TOP_P = range(9)
BANNED = TOP_P + 1  # MAX_BANNED columns
TABLE = BANNED + MAX_BANNED


@functools.cache
def make_step(graphdef: nnx.GraphDef, *, absorbed: bool, impl: str = "xla") -> Callable:
    """The jitted step of a model with graph definition `graphdef` (module docstring); one per
    graph definition, so that engines over the same architecture share compiled programs.
    impl: the absorbed path's attention core (`infer.decode_attention_impl`)."""

    def step(state, cache, ids, positions, pages: Pages, select):
        model = nnx.merge(graphdef, state)
        g, cache, experts = model.extend(ids, positions, cache, ExtendContext(pages, absorbed, impl))
        g = jnp.take_along_axis(g, select[..., None], axis=1)
        return model.logits_from_hidden(g), g, cache, experts

    return jax.jit(step, donate_argnums=(1,))


def pack_decode(
    rows: int,
    tokens: list[int],
    sources: list[int],
    positions: list[int],
    params: list[SamplingParams],
    seeds: list[int],
    counters: list[int],
    banned: list[list[int]],
    table: np.ndarray,
) -> np.ndarray:
    """The host inputs of one decode step (module docstring) for len(tokens) requests, padded
    to `rows` rows: [rows, 9 + S + M] int32 with each row's banned ids (at most S) in S columns
    and the block table [rows, M] in the last M columns; padding rows write nothing and sample
    greedily."""
    k = len(tokens)
    pad = SamplingParams()
    packed = np.zeros((rows, TABLE + table.shape[1]), np.int32)
    packed[:, SOURCE] = -1
    packed[:, BANNED:TABLE] = -1
    for b, ids in enumerate(banned):
        packed[b, BANNED : BANNED + len(ids)] = ids
    packed[:, TOP_P] = np.float32(pad.top_p).view(np.int32)
    packed[:k, TOKEN] = tokens
    packed[:k, SOURCE] = sources
    packed[:k, POSITION] = positions
    packed[:k, WRITE] = 1
    packed[:k, SEED] = np.asarray(seeds, np.uint32).view(np.int32)
    packed[:k, COUNTER] = counters
    packed[:k, TOP_K] = [p.top_k for p in params]
    packed[:k, TEMPERATURE] = np.asarray([p.temperature for p in params], np.float32).view(np.int32)
    packed[:k, TOP_P] = np.asarray([p.top_p for p in params], np.float32).view(np.int32)
    packed[:, TABLE:] = table
    return packed


@functools.cache
def make_decode_step(graphdef: nnx.GraphDef, *, impl: str = "xla", tempered: bool = False) -> Callable:
    """The jitted decode-and-sample step (module docstring) of a model with graph definition
    `graphdef`, the cache donated; tempered: it also returns the tempered log-probs (else None)."""

    def step(state, cache, previous, packed):
        model = nnx.merge(graphdef, state)
        column = functools.partial(jax.lax.index_in_dim, packed, axis=1, keepdims=False)
        bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
        source = column(SOURCE)
        ids = jnp.where(source >= 0, previous[jnp.maximum(source, 0)], column(TOKEN))[:, None]
        pages = Pages(packed[:, TABLE:], (column(WRITE) > 0)[:, None])
        g, cache, experts = model.extend(
            ids, column(POSITION)[:, None], cache, ExtendContext(pages, True, impl)
        )
        logits = model.logits_from_hidden(g)[:, 0]
        temperature = bits(column(TEMPERATURE))
        tokens, logprobs = sample(
            logits,
            temperature,
            column(TOP_K),
            bits(column(TOP_P)),
            jax.lax.bitcast_convert_type(column(SEED), jnp.uint32),
            column(COUNTER),
            packed[:, BANNED:TABLE],
        )
        top_ids, top_values = top_logprobs(logits)
        tempered_values = tempered_logprobs(logits, temperature, tokens) if tempered else None
        tokens = jax.lax.dynamic_update_slice(jnp.zeros_like(previous), tokens, (0,))
        return tokens, logprobs, top_ids, top_values, tempered_values, cache, experts

    return jax.jit(step, donate_argnums=(1,))
