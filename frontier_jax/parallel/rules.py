"""Logical axis names -> mesh axes.

Model code names every parameter dimension and every constrained activation dimension with a
*logical* name (`"embed"`, `"heads"`, `"expert"`, ...).  This module alone maps those names to
mesh axes (`stage`, `data`, `fsdp`, `expert`, `tensor`).  Changing a parallelism layout means
editing a rules table, never a model file.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("stage", "data", "fsdp", "expert", "tensor")

# Every logical name used by the model, and the mesh axes it is sharded over by default.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "q_lora": (),
    "kv_lora": (),
    "qk_head": (),
    "v_head": (),
    "rope": (),
    "mlp": ("tensor",),
    "moe_mlp": ("tensor",),
    "expert": ("expert",),
    "layers": ("stage",),  # the MoE stack's layers: pipeline stages hold their chunks (`pipeline/plan.py`)
    "dense_layers": (),  # the dense prefix runs with the embedding, on every stage
    "mtp_layers": (),  # the MTP modules run with the head, on every stage
    "norm": (),
    "concat_embed": (),
    "score": (),  # the scalar head's one output (`model/reward.py`)
}

# Pure data parallelism: only the batch is split; every parameter is replicated (but for the
# MoE layers' split over pipeline stages, which hold only their own chunks).
REPLICATED_RULES: dict[str, tuple[str, ...]] = {name: () for name in DEFAULT_RULES} | {
    "batch": ("data", "fsdp", "expert"),
    "layers": ("stage",),
}

RULE_SETS: dict[str, dict[str, tuple[str, ...]]] = {"default": DEFAULT_RULES, "replicated": REPLICATED_RULES}

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("frontier_jax_sharding", default=None)


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, Sequence[str]]) -> PartitionSpec:
    """PartitionSpec for a tensor whose dimensions carry the logical names `axes`.

    A mesh axis is used at most once per tensor: a later dimension that maps to an axis an
    earlier dimension already took is left unsharded along it."""
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        mesh_axes = tuple(a for a in rules[name] if a not in used)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_sharding(mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES):
    """Within this context, `constrain` pins activations to `mesh` according to `rules`."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside `use_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))
