"""The pure, jitted model steps of the engine: T new tokens per row through the model over
the paged latent cache (donated, so it is updated in place), logits at chosen positions.

    step(state, cache, ids [B, T], positions [B, T], pages, select [B, K])
        -> (logits [B, K, vocab] fp32, final-normed hidden g [B, K, d], cache,
            routed experts [L_moe, B, T, K_r] or None)

Prefill chunks take the expanded MLA path, decode steps the absorbed one (`MLA.extend`).  jax.jit
compiles once per shape; the engine pads B, T and the block table's width to a few buckets so
that a handful of programs serve every request mix.

Plain decoding runs one program per step that also picks its input tokens and samples:

    decode(state, cache, previous [R], packed [B, 11 + 2S + M])
        -> (tokens [R], logprobs [B], top ids [B, k], top log-probs [B, k],
            tempered log-probs [B] or None, cache, routed experts [L_moe, B, 1, K_r] or None)

row b's input token is previous[source_b] (the token the previous step sampled for that request,
still on the device) when source_b >= 0, else the host's token_b; `packed` holds every per-row
host input in one int32 array (`pack_decode`: one transfer per step), floats and seeds by their
bits, then S = MAX_BANNED ids the row may not pick while counter < min_tokens (-1: none), its
min_tokens, the tokens it may still take (limit) and S of its stop ids (the last two read only by
the k-step program); the top
ids and log-probs are the k = MAX_LOGPROBS most likely tokens (`sampling.top_logprobs`), the
tempered log-probs log softmax(z / temperature)[token] (`sampling.tempered_logprobs`; only the
program made with tempered=True computes them, the one steps run when a row asks); tokens come back padded to R rows (R = the most rows of a step), so that they can feed the
next step whatever its bucket.  The routed experts stay on the device: the engine counts the
real rows' expert loads from them (`expert_load.count_experts`) and reads them back for the
rows that record their routing (`SamplingParams.record_routing`).

Several decode steps per dispatch (`infer.decode_steps_per_dispatch` = n > 1) run the same
one-step body n times in one program (a scan), each step's sampled tokens the next step's input:

    decode_steps(state, cache, previous [R], packed [B, 11 + 2S + M])
        -> (tokens [n, B], logprobs [n, B], top ids [n, B, k], top log-probs [n, B, k],
            tempered log-probs [n, B] or None, cache, routed experts [n, L_moe, B, 1, K_r] or None)

step i of row b runs at position position_b + i with counter_b + i (so it samples exactly the
token the one-step loop samples), banned ids applied while counter_b + i < min_tokens_b; the row
is done after a step that samples one of its stop ids or once i reaches its limit (the tokens it
may still take), and its later steps write no cache (their tokens are ignored by the engine).  A
row with more than S stop ids stops on the device at the first S only; the engine's host check
catches the rest (the row then writes a few positions more into its own blocks, never read).
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
MIN_TOKENS = BANNED + MAX_BANNED
LIMIT = MIN_TOKENS + 1  # tokens the row may still take (k-step decoding)
STOP = LIMIT + 1  # MAX_BANNED columns of stop ids (k-step decoding; -1: none)
TABLE = STOP + MAX_BANNED


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
    min_tokens: list[int] | None = None,
    limits: list[int] | None = None,
    stops: list[list[int]] | None = None,
) -> np.ndarray:
    """The host inputs of one decode dispatch (module docstring) for len(tokens) requests, padded
    to `rows` rows: [rows, 11 + 2S + M] int32 with each row's banned ids (at most S) in S columns,
    min_tokens (default 0), limit (default 1) and stop ids (first S; default none), and the block
    table [rows, M] in the last M columns; padding rows write nothing, take no token and sample
    greedily."""
    k = len(tokens)
    pad = SamplingParams()
    packed = np.zeros((rows, TABLE + table.shape[1]), np.int32)
    packed[:, SOURCE] = -1
    packed[:, BANNED:MIN_TOKENS] = -1
    packed[:, STOP:TABLE] = -1
    for b, ids in enumerate(banned):
        packed[b, BANNED : BANNED + len(ids)] = ids
    for b, ids in enumerate(stops or []):
        ids = ids[:MAX_BANNED]
        packed[b, STOP : STOP + len(ids)] = ids
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
    packed[:k, MIN_TOKENS] = min_tokens if min_tokens is not None else 0
    packed[:k, LIMIT] = limits if limits is not None else 1
    packed[:, TABLE:] = table
    return packed


def _decode_and_sample(model, cache, ids, packed, step, write, impl: str, tempered: bool):
    """The one-step body: ids [B] at positions POSITION + step through the absorbed path
    (writing the cache where write [B]), sampled with counter COUNTER + step and the banned ids
    while that counter < MIN_TOKENS -> (tokens [B], logprobs [B], top ids [B, k'], top log-probs
    [B, k'], tempered log-probs [B] or None, cache, routed experts [L_moe, B, 1, K_r] or None)."""
    column = functools.partial(jax.lax.index_in_dim, packed, axis=1, keepdims=False)
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
    pages = Pages(packed[:, TABLE:], write[:, None])
    g, cache, experts = model.extend(
        ids[:, None], (column(POSITION) + step)[:, None], cache, ExtendContext(pages, True, impl)
    )
    logits = model.logits_from_hidden(g)[:, 0]
    temperature = bits(column(TEMPERATURE))
    counter = column(COUNTER) + step
    banned = jnp.where((counter < column(MIN_TOKENS))[:, None], packed[:, BANNED:MIN_TOKENS], -1)
    tokens, logprobs = sample(
        logits,
        temperature,
        column(TOP_K),
        bits(column(TOP_P)),
        jax.lax.bitcast_convert_type(column(SEED), jnp.uint32),
        counter,
        banned,
    )
    top_ids, top_values = top_logprobs(logits)
    tempered_values = tempered_logprobs(logits, temperature, tokens) if tempered else None
    return tokens, logprobs, top_ids, top_values, tempered_values, cache, experts


def _input_tokens(previous, packed):
    """Row b's input token [B]: previous[source_b] when source_b >= 0, else the host's token_b."""
    source = packed[:, SOURCE]
    return jnp.where(source >= 0, previous[jnp.maximum(source, 0)], packed[:, TOKEN])


@functools.cache
def make_decode_step(graphdef: nnx.GraphDef, *, impl: str = "xla", tempered: bool = False) -> Callable:
    """The jitted decode-and-sample step (module docstring) of a model with graph definition
    `graphdef`, the cache donated; tempered: it also returns the tempered log-probs (else None)."""

    def step(state, cache, previous, packed):
        model = nnx.merge(graphdef, state)
        tokens, *rest = _decode_and_sample(
            model, cache, _input_tokens(previous, packed), packed, 0, packed[:, WRITE] > 0, impl, tempered
        )
        return jax.lax.dynamic_update_slice(jnp.zeros_like(previous), tokens, (0,)), *rest

    return jax.jit(step, donate_argnums=(1,))


@functools.cache
def make_decode_steps(
    graphdef: nnx.GraphDef, steps: int, *, impl: str = "xla", tempered: bool = False
) -> Callable:
    """The jitted program of `steps` decode steps per dispatch (module docstring: decode_steps),
    a scan over the one-step body, the cache donated."""

    def run(state, cache, previous, packed):
        stops = packed[:, STOP:TABLE]

        def body(carry, i):
            cache, ids, done = carry
            active = ~done & (i < packed[:, LIMIT])
            model = nnx.merge(graphdef, state)
            tokens, *rest, cache, experts = _decode_and_sample(
                model, cache, ids, packed, i, active & (packed[:, WRITE] > 0), impl, tempered
            )
            done = ~active | jnp.any(tokens[:, None] == stops, axis=1)
            return (cache, tokens, done), (tokens, *rest, experts)

        ids = _input_tokens(previous, packed)
        done = jnp.zeros(ids.shape, bool)
        (cache, _, _), (tokens, logprobs, top_ids, top_values, tempered_values, experts) = jax.lax.scan(
            body, (cache, ids, done), jnp.arange(steps, dtype=jnp.int32)
        )
        return tokens, logprobs, top_ids, top_values, tempered_values, cache, experts

    return jax.jit(run, donate_argnums=(1,))
