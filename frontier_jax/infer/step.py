"""The pure, jitted model steps of the engine: T new tokens per row through the model over
the paged latent cache (donated, so it is updated in place), logits at chosen positions.

    step(state, cache, ids [B, T], positions [B, T], pages, select [B, K])
        -> (logits [B, K, vocab] fp32, final-normed hidden g [B, K, d], cache)

Prefill chunks take the expanded MLA path, decode steps the absorbed one (`MLA.extend`).  jax.jit
compiles once per shape; the engine pads B, T and the block table's width to a few buckets so
that a handful of programs serve every request mix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.model.latent_cache import Pages


@functools.cache
def make_step(graphdef: nnx.GraphDef, *, absorbed: bool, impl: str = "xla") -> Callable:
    """The jitted step of a model with graph definition `graphdef` (module docstring); one per
    graph definition, so that engines over the same architecture share compiled programs."""

    def step(state, cache, ids, positions, pages: Pages, select):
        model = nnx.merge(graphdef, state)
        g, cache = model.extend(ids, positions, cache, pages, absorbed=absorbed, impl=impl)
        g = jnp.take_along_axis(g, select[..., None], axis=1)
        return model.logits_from_hidden(g), g, cache

    return jax.jit(step, donate_argnums=(1,))
