"""Expert loads seen by inference: per MoE layer, how many token assignments each routed
expert received, counted on the device.

    load[l, e] += #{(b, t, k) : counted[b, t] and experts[l, b, t, k] = e}

after every forward, with experts [L_moe, B, T, K] the experts each MoE layer routed each position
to (`Transformer.extend`) and `counted` the real positions the forward processed: prompt
chunks, decode rows, the drafts a speculative verification runs; never padding, nor the row of a
request that finished while the next decode step was already in flight (its token is dropped).
The MTP modules' drafting forwards are not counted (they are not among the model's MoE layers).
Each counted position adds K (top-k) assignments to its layer's row: load.sum(1) = K tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from frontier_jax.runtime.expert_ledger import ExpertLoad

__all__ = ["ExpertLoad", "count_experts", "empty_load"]


@functools.partial(jax.jit, donate_argnums=0)
def count_experts(load: jax.Array, experts: jax.Array, counted: jax.Array) -> jax.Array:
    """load [L, N_r] int32 (donated) + the assignments in experts [L, B, T, K] at the positions
    where counted [B, T] (module docstring)."""
    layers = jnp.arange(load.shape[0])[:, None, None, None]
    weights = jnp.broadcast_to(counted[None, :, :, None], experts.shape).astype(load.dtype)
    return load.at[layers, experts].add(weights)


def empty_load(num_layers: int, num_experts: int, sharding=None) -> jax.Array:
    """A zero count [num_layers, num_experts] int32 (on `sharding` when given)."""
    return jax.device_put(jnp.zeros((num_layers, num_experts), jnp.int32), sharding)
