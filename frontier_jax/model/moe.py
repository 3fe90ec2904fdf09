"""DeepSeekMoE layer (V3 report, eq. 12):

    h'_t = u_t + sum_{i<=N_s} FFN_i^(s)(u_t) + sum_{i<=N_r} g_{i,t} FFN_i^(r)(u_t)

Shared experts are one SwiGLU of width N_s * f.  Routed experts are SwiGLUs stacked as
W_gate, W_up [N_r, d, f] and W_down [N_r, f, d]; how their tokens are dispatched (locally, or
over the mesh with all-to-all; "dropless" or "capacity" by `impl.moe_dispatch`) is the
`ExpertDispatcher` the model is given (`frontier_jax.ops.dispatch`).

With `impl.expert_replicas` = R the layer's experts run on E + R physical slots (a placement,
`parallel.placement`, held as `ExpertSlots` state: physical_to_logical [E+R],
logical_to_physical [E, R+1], copies [E]); the weights stay the E logical experts' unless
whoever runs the model stores the slots' copies in their place (the inference engine, which
materialises them when it applies a placement).

Routing replay: given the experts each token is to run on ([B, T, K_r], e.g. those the inference
engine routed the token to when it sampled it), the layer runs those experts with gates from its
current router (`routing.route`); the statistics below then count the replayed selection.

Returned statistics: per-expert load (assignments of real tokens), the sequence-wise balance
loss L_bal = sum_i f_i P_i SUMMED over rows (eqs. 17-20; training divides it by the number of
rows of the whole global batch that hold real tokens and multiplies by alpha, so that rows
switched off by the batch-size ramp or without tokens neither count nor dilute it), and the
number of dropped assignments.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frontier_jax.model.config import ImplConfig, ModelConfig
from frontier_jax.model.layers import normal_param
from frontier_jax.model.mlp import SwiGLU
from frontier_jax.model.routing import Router
from frontier_jax.ops.dispatch import (
    ExpertDispatcher,
    ExpertDispatchSpec,
    ExpertSlotMap,
    LocalExperts,
    RoutedOutput,
)
from frontier_jax.ops.routing import Routing
from frontier_jax.parallel.placement import Placement
from frontier_jax.parallel.rules import constrain
from frontier_jax.precision import PrecisionPolicy
from frontier_jax.precision.recipe import FP8_WEIGHT


class MoEStats(NamedTuple):
    load: jax.Array  # [N_r] assignments per expert (fp32, real tokens only)
    balance_loss: jax.Array  # scalar, sequence-wise L_bal summed over rows, without alpha
    dropped: jax.Array  # scalar, assignments dropped by the capacity limit
    groups_per_token: jax.Array  # scalar, mean number of distinct expert groups a token reaches
    a2a_bytes: jax.Array  # scalar, bytes sent to other devices by the expert all-to-alls


def sequence_balance_loss(routing: Routing, token_mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """sum over rows of L_bal (a row without real tokens adds 0).  token_mask [B, T]; routing
    arrays flattened over B*T.

    Per row with T' >= 1 real tokens: f_i = N_r / (K T') sum_t 1[i in TopK_t],
    P_i = (1/T') sum_t s_{i,t} / sum_j s_{j,t},  L = sum_i f_i P_i.  The mean over rows is this
    sum over `rows_with_tokens(token_mask)` (of the whole batch when it is split)."""
    b, t = token_mask.shape
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    mask = token_mask.astype(jnp.float32)
    chosen = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32).sum(1).reshape(b, t, e)
    normed = (routing.scores / routing.scores.sum(-1, keepdims=True)).reshape(b, t, e)
    n_tok = jnp.maximum(mask.sum(1), 1.0)[:, None]
    f = e / k * (chosen * mask[..., None]).sum(1) / n_tok
    p = (normed * mask[..., None]).sum(1) / n_tok
    return jnp.sum(f * p)


def rows_with_tokens(token_mask: jax.Array) -> jax.Array:
    """Number of rows of token_mask [B, T] with at least one real token (int32)."""
    return jnp.sum(jnp.any(token_mask != 0, axis=1)).astype(jnp.int32)


def groups_per_token(experts: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean over tokens of the number of distinct expert groups among its K experts [N, K]."""
    groups = jax.nn.one_hot(experts // (cfg.n_routed_experts // cfg.n_group), cfg.n_group)
    return jnp.mean(jnp.sum(groups.max(axis=1), axis=-1))


def dispatch_spec(cfg: ModelConfig, impl: ImplConfig) -> ExpertDispatchSpec:
    """The model's numbers and implementation choices an expert dispatcher needs."""
    return ExpertDispatchSpec(
        n_experts=cfg.n_routed_experts,
        top_k=cfg.num_experts_per_tok,
        dispatch=impl.moe_dispatch,
        capacity_factor=impl.moe_capacity_factor,
        gmm_impl=impl.gmm,
        gmm_gather=impl.gmm_gather,
        overlap_chunks=impl.ep_overlap_chunks,
    )


class ExpertSlots(nnx.Variable):
    """A MoE layer's placement of its experts on physical slots (int32; set, never trained)."""


SLOT_ARRAYS = ("physical_to_logical", "logical_to_physical", "copies")  # the ExpertSlots of a layer


def default_slots(slots: dict) -> dict:
    """The pure dict of `ExpertSlots` arrays (`nnx.State`'s pure dict, abstract or not) filled
    with the default placement: slot s holds expert s mod E in every layer."""
    if "physical_to_logical" not in slots:
        return {key: default_slots(value) for key, value in slots.items()}
    *layers, num_slots = slots["physical_to_logical"].shape
    num_experts = slots["copies"].shape[-1]
    placement = Placement.from_physical(
        np.tile(np.arange(num_slots) % num_experts, (math.prod(layers), 1)), num_experts
    )
    return {
        name: getattr(placement, name).reshape(*layers, *getattr(placement, name).shape[1:])
        for name in SLOT_ARRAYS
    }


class RoutedExperts(nnx.Module):
    """N_r SwiGLU experts as stacked weights, computed by the given dispatcher; with
    `impl.expert_replicas` = R on the N_r + R slots of the layer's placement (`ExpertSlots`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        policy: PrecisionPolicy,
        impl: ImplConfig = ImplConfig(),
        experts: ExpertDispatcher = LocalExperts(),
        rngs: nnx.Rngs,
    ):
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_ffn_dim
        self.spec, self.policy, self.dispatcher = dispatch_spec(cfg, impl), policy, experts
        self.remat_experts = impl.remat == "experts"
        self.scanned = impl.scan_layers
        self.w_gate = normal_param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg.init_std)
        self.w_up = normal_param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg.init_std)
        self.w_down = normal_param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), cfg.init_std)
        self.replicas = impl.expert_replicas
        if self.replicas is not None:
            if isinstance(experts, LocalExperts):
                raise ValueError(
                    f"impl.expert_replicas={self.replicas} needs expert parallelism (a mesh whose `expert` axis "
                    "> 1 splits the experts); without it set impl.expert_replicas=null"
                )
            default = default_slots(
                {"physical_to_logical": np.zeros(e + self.replicas), "copies": np.zeros(e)}
            )
            self.physical_to_logical = ExpertSlots(default["physical_to_logical"], logical_axes=(None,))
            self.logical_to_physical = ExpertSlots(default["logical_to_physical"], logical_axes=(None, None))
            self.copies = ExpertSlots(default["copies"], logical_axes=(None,))

    def __call__(self, x: jax.Array, routing: Routing, token_mask: jax.Array | None = None) -> RoutedOutput:
        """x [N, d], token_mask [N] (1 = real token; padding takes no capacity slot) ->
        (sum_k g_k FFN_{e_k}(x) [N, d], dropped assignments of real tokens, all-to-all bytes).

        With a placement the weights are the slots' copies: W[physical_to_logical] [E+R, ...],
        gathered here from the logical [E, ...] weights (so gradients sum back over an expert's
        copies and the optimizer sees only the logical weights), or already stored [E+R, ...]
        (the engine's; told apart by the leading dimension, R >= 1).

        `impl.remat=experts`: the dispatcher runs under its own checkpoint, so the
        backward recomputes its dispatch gathers, grouped GEMMs and combine instead of keeping
        their rows (the quantized fp8 weights, `FP8_WEIGHT`, are kept)."""

        weights = (self.w_gate[...], self.w_up[...], self.w_down[...])
        slots = None
        if self.replicas is not None:
            slots = ExpertSlotMap(self.logical_to_physical[...], self.copies[...])
            if weights[0].shape[0] == self.spec.n_experts:  # logical: copy them to the slots
                weights = tuple(jnp.take(w, self.physical_to_logical[...], axis=0) for w in weights)

        def routed(x, routing, token_mask, w_gate, w_up, w_down, slots):
            return self.dispatcher(
                x,
                routing,
                w_gate,
                w_up,
                w_down,
                spec=self.spec,
                policy=self.policy,
                token_mask=token_mask,
                slots=slots,
            )

        if self.remat_experts:
            routed = jax.checkpoint(
                routed,
                policy=jax.checkpoint_policies.save_only_these_names(FP8_WEIGHT),
                prevent_cse=not self.scanned,  # as `block._remat` (conservative in MTP's scan)
            )
        return routed(x, routing, token_mask, *weights, slots)


class MoE(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        policy: PrecisionPolicy,
        impl: ImplConfig = ImplConfig(),
        experts: ExpertDispatcher = LocalExperts(),
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.router = Router(cfg, rngs=rngs)
        self.experts = RoutedExperts(cfg, policy=policy, impl=impl, experts=experts, rngs=rngs)
        if cfg.n_shared_experts:
            self.shared = SwiGLU(
                cfg.hidden_size,
                cfg.n_shared_experts * cfg.moe_ffn_dim,
                std=cfg.init_std,
                policy=policy,
                rngs=rngs,
                name="moe.shared",
            )

    def __call__(
        self, x: jax.Array, token_mask: jax.Array, routed_experts: jax.Array | None = None
    ) -> tuple[jax.Array, MoEStats]:
        """x [B, T, d], token_mask [B, T] (1 = real token), routed_experts [B, T, K_r] int32 (the
        experts to replay) or None (route) -> ([B, T, d], MoEStats)."""
        y, routing, dropped, a2a_bytes = self._mix(x, token_mask, routed_experts)
        load = (
            jnp.zeros((self.cfg.n_routed_experts,), jnp.float32)
            .at[routing.experts]
            .add(jnp.broadcast_to(token_mask.reshape(-1, 1), routing.experts.shape).astype(jnp.float32))
        )
        stats = MoEStats(
            load,
            sequence_balance_loss(routing, token_mask, self.cfg),
            dropped,
            groups_per_token(routing.experts, self.cfg),
            a2a_bytes,
        )
        return y, stats

    def routed(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`__call__` without the statistics, for inference: x [B, T, d], token_mask [B, T] ->
        ([B, T, d], the K experts each token is routed to [B, T, K] int32)."""
        y, routing, _, _ = self._mix(x, token_mask)
        return y, routing.experts.reshape(*x.shape[:2], -1)

    def _mix(self, x: jax.Array, token_mask: jax.Array, routed_experts: jax.Array | None = None):
        """x [B, T, d] -> (eq. 12's output [B, T, d], Routing over the B T tokens, dropped
        assignments, all-to-all bytes); routed_experts [B, T, K_r]: the selection to replay."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        replay = None if routed_experts is None else routed_experts.reshape(b * t, -1)
        routing = self.router(flat, replay)
        routed, dropped, a2a_bytes = self.experts(flat, routing, token_mask.reshape(-1))
        y = routed.reshape(b, t, d)
        if self.cfg.n_shared_experts:
            y = y + self.shared(x)
        return constrain(y, ("batch", "seq", "embed")), routing, dropped, a2a_bytes
