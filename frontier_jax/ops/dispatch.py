"""How the routed experts of a MoE layer are computed, given the routing: one interface, two
dispatchers.  The model is *given* a dispatcher by whoever builds it (as it is given the
precision policy):

  * `LocalExperts` (here): every token and every expert in one program (one device, or
    under XLA's automatic partitioning);
  * `parallel.expert.ExpertParallel(mesh, rules)`: experts split over the `expert` mesh axis,
    tokens moved to their experts' devices and back with all-to-all.

Both compute, for x [N, d] routed to K of E SwiGLU experts (weights W_gate, W_up [E, d, f],
W_down [E, f, d]),
    y_n = sum_k g_{n,k} FFN_{e_{n,k}}(x_n)                                        [N, d]
with the assignments laid out by `spec.dispatch` (`expert_compute` gives the layouts):
  * "dropless": the N K assignments laid out expert by expert (each expert's rows padded to the
    grouped matmul's row alignment), one grouped matmul per projection (`gmm_gather` "dispatch":
    the gate/up kernel reads the token rows itself; "fused": also the down kernel stores its rows
    in token order for the combine; where the Pallas bf16 kernel runs, `LocalExperts` only);
  * "capacity": each expert takes at most C = ceil(capacity_factor N K / E) assignments of
    real tokens (first come, in token order) into an [E, C, d] buffer (batched matmuls; fp8
    grouped matmuls over 128-row-aligned groups when the precision policy runs the experts in
    fp8); the overflow is dropped (contributes zero) and counted.  Padding tokens (token_mask
    0: padding, rows switched off by the batch-size ramp) take no place and get no routed
    output.  N is the number of token positions dispatched together, so C is static; i.e. the
    factor is relative to the mean load of a fully real batch.

What "dispatched together" means is the one difference between the dispatchers: `LocalExperts`
ranks all N tokens of the layer; `ExpertParallel` applies the same rule to each device's token
shard (per overlap chunk), C = ceil(capacity_factor n K / E) for its n tokens, so each expert
holds the same total capacity and a shard's tokens drop exactly as `LocalExperts` would drop
them if given that shard alone.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from frontier_jax.kernels.grouped_gemm import TILE_ROWS, padded_rows_bound
from frontier_jax.ops.expert_compute import (
    capacity_slots,
    collect,
    combine,
    combine_scatter,
    dispatch,
    dispatch_gather,
    dropless_slots,
    swiglu_batched,
    swiglu_grouped,
)
from frontier_jax.ops.grouped_matmul import GmmGather, GmmImpl, fp8_experts, fuses_gather, row_alignment
from frontier_jax.ops.routing import Routing
from frontier_jax.precision import PrecisionPolicy


class MoeDispatch(enum.StrEnum):
    dropless = "dropless"
    capacity = "capacity"


@dataclass(frozen=True)
class ExpertDispatchSpec:
    """The numbers a dispatcher needs from the model and its implementation choices."""

    n_experts: int  # E = N_r routed experts
    top_k: int  # K experts per token
    dispatch: MoeDispatch
    capacity_factor: float  # "capacity": C = ceil(capacity_factor N K / E)
    gmm_impl: GmmImpl  # grouped matmul kernel
    overlap_chunks: int = 1  # expert parallelism: chunks whose all-to-all overlaps the others' compute
    gmm_gather: GmmGather = GmmGather.xla  # dropless: which row moves run inside the Pallas kernels


class RoutedOutput(NamedTuple):
    y: jax.Array  # [N, d] sum_k g_k FFN_{e_k}(x), in x's dtype
    dropped: jax.Array  # int32 scalar: assignments dropped by the capacity limit
    a2a_bytes: jax.Array  # fp32 scalar: bytes sent to other devices by the all-to-alls


class ExpertSlotMap(NamedTuple):
    """Where each logical expert of one layer has copies (`parallel.placement`): an assignment to
    expert e goes to one of the slots logical_to_physical[e, :copies[e]]."""

    logical_to_physical: jax.Array  # [E, R+1] int32 physical slots of each expert, padded with -1
    copies: jax.Array  # [E] int32 slots holding each expert (>= 1)


class ExpertDispatcher(Protocol):
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
        """x [N, d] (all tokens), routing over N, token_mask [N] (1 = real token, None = all)
        -> the routed experts' output.  With `slots` (a placement, expert parallelism only) the
        weights are those of the E + R physical slots [E+R, ...] and each assignment runs on one
        copy of its expert."""


def assignment_mask(token_mask: jax.Array | None, n: int, k: int) -> jax.Array:
    """token_mask [N] (None: all real) -> [N K] bool, token-major like the assignments."""
    if token_mask is None:
        return jnp.ones((n * k,), bool)
    return jnp.repeat(token_mask.reshape(-1) != 0, k)


@dataclass(frozen=True)
class LocalExperts:
    """All tokens and all experts in one program: no all-to-all (a2a_bytes = 0)."""

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
        if slots is not None:
            raise ValueError("redundant expert slots (a placement) run under expert parallelism only")
        n, d = x.shape
        e, k = spec.n_experts, spec.top_k
        weights = (w_gate, w_up, w_down)
        dtype = policy.compute_dtype
        flat_expert = routing.experts.reshape(-1)  # [N K]
        if spec.dispatch == "dropless":
            align = row_alignment(spec.gmm_impl, policy)
            slot, sizes = dropless_slots(flat_expert, e, align)
            rows = padded_rows_bound(n * k, e, align)
            in_kernel = spec.gmm_gather if fuses_gather(spec.gmm_impl, policy) else GmmGather.xla
            if in_kernel == "xla":
                xs, gather = dispatch(x.astype(dtype), slot, rows), None
            else:
                xs, gather = x.astype(dtype), dispatch_gather(slot, n, rows)
            scatter = combine_scatter(slot, routing.weights, rows) if in_kernel == "fused" else None
            out = swiglu_grouped(
                xs,
                sizes,
                *weights,
                impl=spec.gmm_impl,
                dtype=dtype,
                policy=policy,
                gather=gather,
                combine=scatter,
            )
            y = out if scatter is not None else combine(collect(out, slot), routing.weights)
            dropped = jnp.zeros((), jnp.int32)
        else:
            capacity = math.ceil(spec.capacity_factor * n * k / e)
            valid = assignment_mask(token_mask, n, k)
            if fp8_experts(policy):  # fp8 grouped GEMMs over equal, tile-aligned groups
                stride = -(-capacity // TILE_ROWS) * TILE_ROWS
                slot, keep = capacity_slots(flat_expert, e, capacity, stride, valid)
                out = swiglu_grouped(
                    dispatch(x.astype(dtype), slot, e * stride),
                    jnp.full((e,), stride, jnp.int32),
                    *weights,
                    impl=spec.gmm_impl,
                    dtype=dtype,
                    policy=policy,
                )
            else:
                slot, keep = capacity_slots(flat_expert, e, capacity, valid=valid)
                buf = dispatch(x.astype(dtype), slot, e * capacity).reshape(e, capacity, d)
                out = swiglu_batched(buf, *weights, dtype=dtype).reshape(e * capacity, d)
            y = combine(collect(out, slot), routing.weights)
            dropped = (valid.sum() - keep.sum()).astype(jnp.int32)
        return RoutedOutput(y.astype(x.dtype), dropped, jnp.zeros((), jnp.float32))
