"""A placement of redundant experts applied to an engine's model state (`Engine.set_placement`).

The MoE layers' expert weights are stored as the copies of the placement's physical slots,

    W_slots[l, s] = W[l, physical_to_logical[l, s]]        [L, E+R, ...] from W [L, E, ...]

so a decode step reads each copy where it runs, without gathering them every step.  Every
expert holds at least one slot, so the logical weights are the copies in each expert's first
slot, W[l, e] = W_slots[l, logical_to_physical[l, e, 0]], and a new placement is one gather of
the stored copies:

    W_new[l, s] = W_slots[l, logical_to_physical_cur[l, physical_to_logical_new[l, s], 0]]

The gathers keep each weight's shape, dtype and sharding, and the placement's arrays (the
layers' `ExpertSlots`) keep theirs, so the compiled steps run on without recompiling.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import traverse_util

from frontier_jax.model.moe import SLOT_ARRAYS
from frontier_jax.parallel.placement import Placement

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def moe_experts(state: dict) -> dict | None:
    """The routed experts' state of the model's MoE layer stack (None: no MoE layer)."""
    return state.get("moe_layers", {}).get("blocks", {}).get("ffn", {}).get("experts")


def slot_count(state: dict) -> int | None:
    """Physical expert slots per MoE layer of the model state (None: it runs without)."""
    experts = moe_experts(state) or {}
    return experts["physical_to_logical"].shape[-1] if "physical_to_logical" in experts else None


@functools.partial(jax.jit, static_argnums=2)
def _take_slots(weight: jax.Array, index: jax.Array, sharding) -> jax.Array:
    """weight [L, M, ...], index [L, S] -> weight[l, index[l, s]] [L, S, ...] laid out as `sharding`."""
    return jax.lax.with_sharding_constraint(jax.vmap(lambda w, i: w[i])(weight, index), sharding)


def _with_experts(state: dict, index: np.ndarray, slots: Placement | None) -> dict:
    """`state` with the MoE experts' weights gathered by index [L, S] along their expert axis
    and, when `slots` is given, the layers' slot arrays set to it (each array placed like the
    one it replaces)."""
    experts = dict(moe_experts(state))
    index = jax.numpy.asarray(index, np.int32)
    for name in EXPERT_WEIGHTS:
        experts[name] = _take_slots(experts[name], index, experts[name].sharding)
    if slots is not None:
        for name in SLOT_ARRAYS:
            experts[name] = jax.device_put(getattr(slots, name), experts[name].sharding)
    ffn = {**state["moe_layers"]["blocks"]["ffn"], "experts": experts}
    blocks = {**state["moe_layers"]["blocks"], "ffn": ffn}
    return {**state, "moe_layers": {**state["moe_layers"], "blocks": blocks}}


def place_experts(state: dict, placement: Placement, current: Placement | None) -> dict:
    """The model state with its MoE experts stored as `placement`'s slot copies; `current`: the
    placement whose copies `state` holds (None: it holds the logical weights [L, E, ...])."""
    index = placement.physical_to_logical
    if current is not None:
        index = np.take_along_axis(current.logical_to_physical[..., 0], index, axis=1)
    return _with_experts(state, index, placement)


def logical_experts(state: dict, current: Placement) -> dict:
    """The model state holding `current`'s slot copies, with the logical weights [L, E, ...]
    instead (each expert's first copy) and without any slot arrays: the parameters and expert
    biases of the model, as `load_weights` receives them."""
    flat = traverse_util.flatten_dict(_with_experts(state, current.logical_to_physical[..., 0], None))
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] not in SLOT_ARRAYS})


def slot_arrays(state: dict) -> dict:
    """Only the slot arrays (`ExpertSlots`) of the model state, flattened by path."""
    return {k: v for k, v in traverse_util.flatten_dict(state).items() if k[-1] in SLOT_ARRAYS}
