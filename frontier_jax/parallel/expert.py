"""Expert parallelism: routed experts sharded over the `expert` mesh axis, tokens moved to the
devices that own their experts and back with all-to-all, inside `shard_map`.

With P devices on the `expert` axis, device p owns experts [p E/P, (p+1) E/P).  Per device
(n local tokens, A = n K assignments):
  1-2. pack assignments into a send buffer [P, R, d], R rows per destination device:
     "dropless": the r-th assignment (token order) bound for device q goes to row (q, r),
     R = A (nothing can drop);
     "capacity": the same rule as `ops.dispatch.LocalExperts` applied to this device's tokens:
     expert e takes the first C = ceil(capacity_factor A / E) assignments of real tokens
     (token_mask 1) bound for it, row (q, j C + r) for the r-th one of q's j-th expert,
     R = (E/P) C; the rest are dropped (counted), padding takes no row;
  3. all_to_all over `expert`: device q receives [P, R, d] (block p = p's rows for q), with the
     local expert id of each row (-1 = empty);
  4. local SwiGLU of the received rows with a grouped matmul (rows laid out by local expert);
     with `moe_mlp` split over `tensor`, partial sums of the down projection are psum-ed;
  5. all_to_all back, unpack, and combine y_t = sum_k g_{t,k} y_{t,k} at the token's device.
Tokens are split over the mesh axes of the `batch` rule (which must include `expert`); shared
experts and everything else stay outside, under XLA's automatic partitioning.

Overlap (`impl.ep_overlap_chunks` = c > 1): each device's tokens are processed as c independent
chunks, so the scheduler can run one chunk's all-to-alls while another chunk's experts compute
(the report's idea of hiding dispatch/combine behind work).  Results are identical.

Bytes that leave a device (rows for other devices, both directions, in the compute dtype) are
returned, so the all-to-all traffic is visible per step.

Redundant experts (a placement, `parallel.placement`; `slots` given): the weights are those of
the S = E + R physical slots, [S, ...], slot s on device s // (S/P) holding a copy of logical
expert physical_to_logical[s].  Step 1 first maps each assignment of token t (t = its index in
the whole batch) to expert e onto a copy, round-robin by token position:

    slot = logical_to_physical[e, t mod copies[e]]

and the steps above run over the S slots as they ran over the E experts; the combine sums as
before, so under dropless dispatch the output is the same as without replicas (up to the
order of fp32 sums).  Round-robin rather than "the copy on the sender's own device": it splits
each expert's tokens evenly over its copies wherever they sit (+-1 per sender), which is the
load per copy (load / copies) that the planner balances devices by.  Preferring the local copy
would save traffic, but a copy's load would then depend on which devices send that expert's
tokens, and the planned balance would not hold (a copy on a device that sends much of the
expert's traffic takes all of it).  Under capacity dispatch each *slot* takes
C = ceil(capacity_factor n K / S) assignments of a shard, so replicas change which assignments
are dropped (a hot expert with c copies holds c C of them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from frontier_jax.kernels.grouped_gemm import padded_rows_bound
from frontier_jax.ops.dispatch import (
    ExpertDispatcher,
    ExpertDispatchSpec,
    ExpertSlotMap,
    LocalExperts,
    RoutedOutput,
    assignment_mask,
)
from frontier_jax.ops.expert_compute import (
    capacity_slots,
    collect,
    combine,
    dispatch,
    dropless_slots,
    invert,
    swiglu_grouped,
)
from frontier_jax.ops.grouped_matmul import row_alignment
from frontier_jax.ops.routing import Routing
from frontier_jax.parallel.placement import Placement
from frontier_jax.precision import PrecisionPolicy

EXPERT_AXIS = "expert"

try:  # jax >= 0.7
    from jax import shard_map as _shard_map

    def _smap(f, mesh, in_specs, out_specs, manual):
        return _shard_map(
            f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual, check_vma=False
        )
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map

    def _smap(f, mesh, in_specs, out_specs, manual):
        auto = frozenset(mesh.axis_names) - manual
        return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False, auto=auto)


def _free_axes(mesh: Mesh):
    """(mesh to map over, its axes this map makes manual).  Inside an enclosing `shard_map`
    (a pipeline stage, manual over `stage`) that is the context's abstract mesh without the
    axes already manual: the all-to-alls and sums stay among the devices of one stage."""
    context = jax.sharding.get_abstract_mesh()
    if context.empty or not context.manual_axes:
        return mesh, frozenset(mesh.axis_names)
    return context, frozenset(context.axis_names) - frozenset(context.manual_axes)


def expert_parallel_size(mesh: Mesh, rules: Mapping[str, Sequence[str]]) -> int:
    """Devices experts are split over (1 = no expert parallelism)."""
    if EXPERT_AXIS not in rules.get("expert", ()) or EXPERT_AXIS not in mesh.shape:
        return 1
    return mesh.shape[EXPERT_AXIS]


def _batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
    axes = tuple(a for a in rules["batch"] if a in mesh.shape)
    if EXPERT_AXIS not in axes:
        raise ValueError(
            "expert parallelism needs the `batch` rule to include the `expert` mesh axis "
            f"(tokens are split over it); got batch -> {axes}"
        )
    return axes


def _tensor_axis(mesh: Mesh, rules) -> str | None:
    axes = [a for a in rules.get("moe_mlp", ()) if a in mesh.shape and mesh.shape[a] > 1]
    if len(axes) > 1:
        raise ValueError(f"expert parallelism supports moe_mlp over at most one mesh axis, got {axes}")
    return axes[0] if axes else None


def physical_slots(experts: jax.Array, first: jax.Array | int, slots: ExpertSlotMap) -> jax.Array:
    """experts [n, K] logical ids of the tokens at batch positions first .. first + n - 1 ->
    [n, K] the physical slot of each assignment: logical_to_physical[e, t mod copies[e]]."""
    position = first + jnp.arange(experts.shape[0], dtype=jnp.int32)[:, None]
    return slots.logical_to_physical[experts, position % slots.copies[experts]]


def received_per_device(
    experts: np.ndarray, placement: Placement, devices: int, token_mask: np.ndarray | None = None
) -> np.ndarray:
    """The assignments (token rows) each of the `devices` expert devices receives in each MoE
    layer from one forward, as the dispatch routes them: experts [L, N, K] logical ids of the
    forward's N tokens in batch order (`Transformer.extend`'s routed experts flattened over
    [B, T]), token_mask [N] (None: all count) -> [L, devices] counts.  Each assignment goes to
    the slot `physical_slots` picks, slot s on device s // (S / devices);
    `Placement.identity` is the model without replicas (expert e on device e // (E / devices))."""
    experts = np.asarray(experts, np.int32)
    layers, n, k = experts.shape
    weight = (
        np.ones((n, k)) if token_mask is None else np.repeat(np.asarray(token_mask, float)[:, None], k, 1)
    )
    counts = np.zeros((layers, devices))
    for layer in range(layers):
        slot_map = ExpertSlotMap(
            jnp.asarray(placement.logical_to_physical[layer]), jnp.asarray(placement.copies[layer])
        )
        slot = np.asarray(physical_slots(jnp.asarray(experts[layer]), 0, slot_map))
        np.add.at(counts[layer], slot // (placement.num_slots // devices), weight)
    return counts


def _local_ffn(
    x,
    experts,
    gates,
    token_mask,
    w_gate,
    w_up,
    w_down,
    *,
    spec: ExpertDispatchSpec,
    policy,
    devices: int,
    tensor_axis: str | None,
):
    """Runs on one device: x [n, d], experts/gates [n, K], token_mask [n], local weights [E/P, ...]."""
    n, d = x.shape
    k = spec.top_k
    dtype = policy.compute_dtype
    local_experts = spec.n_experts // devices
    flat = experts.reshape(-1)
    dest = flat // local_experts
    if spec.dispatch == "dropless":  # by destination device, room for every assignment
        slot, keep = capacity_slots(dest, devices, n * k)
        num_slots = devices * n * k
    else:  # by expert (device-major, as experts are), C real assignments each
        capacity = math.ceil(spec.capacity_factor * n * k / spec.n_experts)
        slot, keep = capacity_slots(flat, spec.n_experts, capacity, valid=assignment_mask(token_mask, n, k))
        num_slots = spec.n_experts * capacity
    send = dispatch(x.astype(dtype), slot, num_slots)
    send_ids = jnp.append(flat % local_experts, -1)[invert(slot, num_slots)]  # -1: an empty row
    a2a = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_AXIS, split_axis=0, concat_axis=0)
    recv = a2a(send.reshape(devices, num_slots // devices, d)).reshape(num_slots, d)
    recv_ids = a2a(send_ids.reshape(devices, num_slots // devices)).reshape(-1)
    # local experts: received rows laid out expert by expert, empty rows (-1) in a last group
    key = jnp.where(recv_ids < 0, local_experts, recv_ids)
    align = row_alignment(spec.gmm_impl, policy)
    local_slot, sizes = dropless_slots(key, local_experts + 1, align)
    local_rows = padded_rows_bound(num_slots, local_experts + 1, align)
    out = swiglu_grouped(
        dispatch(recv, local_slot, local_rows),
        sizes[:-1],
        w_gate,
        w_up,
        w_down,
        impl=spec.gmm_impl,
        dtype=dtype,
        policy=policy,
    )
    out = collect(out, local_slot)
    if tensor_axis is not None:
        out = jax.lax.psum(out, tensor_axis)
    back = a2a(out.reshape(devices, num_slots // devices, d)).reshape(num_slots, d)
    y = combine(collect(back, slot), gates)
    me = jax.lax.axis_index(EXPERT_AXIS)
    remote_rows = jnp.sum(keep & (dest != me))
    sent_bytes = 2.0 * remote_rows * d * jnp.dtype(dtype).itemsize
    real = n * k if spec.dispatch == "dropless" else assignment_mask(token_mask, n, k).sum()
    dropped = (real - keep.sum()).astype(jnp.int32)
    return y.astype(x.dtype), dropped, sent_bytes


def expert_parallel_ffn(
    x: jax.Array,
    routing: Routing,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    spec: ExpertDispatchSpec,
    policy: PrecisionPolicy,
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]],
    token_mask: jax.Array | None = None,
    slots: ExpertSlotMap | None = None,
) -> RoutedOutput:
    """x [N, d] (N = all tokens), routing over N, token_mask [N] (None: all real), slots: the
    layer's placement (weights [E+R, ...] of its physical slots) or None (weights [E, ...]) ->
    (routed-expert output [N, d], dropped assignments (global), bytes sent to other devices
    (global))."""
    devices = expert_parallel_size(mesh, rules)
    if spec.n_experts % devices:
        raise ValueError(
            f"model.n_routed_experts={spec.n_experts} is not divisible by the "
            f"expert mesh axis ({devices} devices); change mesh.expert"
        )
    if slots is not None:  # the S physical slots are the experts the all-to-alls address
        spec = dataclasses.replace(spec, n_experts=w_gate.shape[0])
        if spec.n_experts % devices:
            raise ValueError(
                f"{spec.n_experts} expert slots (impl.expert_replicas included) do not split over "
                f"the expert mesh axis ({devices} devices); change impl.expert_replicas"
            )
    batch = _batch_axes(mesh, rules)
    ways = math.prod(mesh.shape[a] for a in batch)
    chunks = spec.overlap_chunks
    if x.shape[0] % (ways * chunks):
        raise ValueError(
            f"{x.shape[0]} tokens do not split over the {ways}-way batch axes {batch} "
            f"into impl.ep_overlap_chunks={chunks} chunks"
        )
    tensor_axis = _tensor_axis(mesh, rules)
    w_in = P(EXPERT_AXIS, None, tensor_axis)
    w_out = P(EXPERT_AXIS, tensor_axis, None)
    tokens = P(batch, None)
    local = functools.partial(_local_ffn, spec=spec, policy=policy, devices=devices, tensor_axis=tensor_axis)

    mesh, manual = _free_axes(mesh)
    replicas = math.prod(size for axis, size in mesh.shape.items() if axis in manual and axis not in batch)

    def per_device(x, experts, gates, token_mask, w_gate, w_up, w_down, slots):
        if slots is not None:  # tokens of this shard sit at batch positions shard n .. shard n + n - 1
            first = jax.lax.axis_index(batch) * experts.shape[0]
            experts = physical_slots(experts, first, slots)
        parts = [
            local(
                *(a.reshape((chunks, -1) + a.shape[1:])[c] for a in (x, experts, gates, token_mask)),
                w_gate,
                w_up,
                w_down,
            )
            for c in range(chunks)
        ]
        y = jnp.concatenate([p[0] for p in parts])
        dropped, sent = sum(p[1] for p in parts), sum(p[2] for p in parts)
        total = lambda v: (
            jax.lax.psum(v, tuple(a for a in mesh.axis_names if a in manual)) / replicas
        )  # replicas count once
        return y, total(dropped).astype(jnp.int32), total(sent)

    if token_mask is None:
        token_mask = jnp.ones((x.shape[0],), jnp.int32)
    fn = _smap(
        per_device,
        mesh,
        in_specs=(tokens, tokens, tokens, P(batch), w_in, w_in, w_out, P()),
        out_specs=(tokens, P(), P()),
        manual=manual,
    )
    return RoutedOutput(*fn(x, routing.experts, routing.weights, token_mask, w_gate, w_up, w_down, slots))


@dataclass(frozen=True)
class ExpertParallel:
    """The expert-parallel dispatcher (`ops.dispatch.ExpertDispatcher`) over `mesh`, splitting
    tensors by the logical-axis `rules` (kept as sorted (name, mesh axes) pairs: hashable, so
    the model that holds it stays a static, cacheable structure)."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...]

    def __init__(self, mesh: Mesh, rules: Mapping[str, Sequence[str]]):
        object.__setattr__(self, "mesh", mesh)
        object.__setattr__(self, "rules", tuple(sorted((k, tuple(v)) for k, v in rules.items())))

    def __call__(
        self,
        x: jax.Array,
        routing: Routing,
        w_gate: jax.Array,
        w_up: jax.Array,
        w_down: jax.Array,
        *,
        spec: ExpertDispatchSpec,
        policy: PrecisionPolicy,
        token_mask: jax.Array | None = None,
        slots: ExpertSlotMap | None = None,
    ) -> RoutedOutput:
        return expert_parallel_ffn(
            x,
            routing,
            w_gate,
            w_up,
            w_down,
            spec=spec,
            policy=policy,
            mesh=self.mesh,
            rules=dict(self.rules),
            token_mask=token_mask,
            slots=slots,
        )


def expert_dispatcher(mesh: Mesh | None, rules: Mapping[str, Sequence[str]]) -> ExpertDispatcher:
    """`ExpertParallel` where `mesh` splits the experts (an `expert` axis > 1 that the `expert`
    rule uses), else `LocalExperts` (tokens and experts under XLA's automatic partitioning)."""
    if mesh is None or expert_parallel_size(mesh, rules) == 1:
        return LocalExperts()
    return ExpertParallel(mesh, rules)
