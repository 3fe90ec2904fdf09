"""DeepSeekMoE layer (V3 report, eq. 12):

    h'_t = u_t + sum_{i<=N_s} FFN_i^(s)(u_t) + sum_{i<=N_r} g_{i,t} FFN_i^(r)(u_t)

Shared experts are one SwiGLU of width N_s * f.  Routed experts are SwiGLUs stacked as
W_gate, W_up [N_r, d, f] and W_down [N_r, f, d].  Token dispatch (`model.moe_dispatch`):
  * "dropless": the N*K (token, expert) assignments are laid out expert by expert (each
    expert's rows padded to the grouped-matmul kernel's row tile) and run through one grouped
    matmul per projection (`grouped_matmul`), then gathered back and combined with the gates.
  * "capacity": each expert takes at most C = ceil(capacity_factor * N K / N_r) assignments
    (first come, in token order) into an [N_r, C, d] buffer computed by a batched matmul (by
    the fp8 grouped matmuls, each expert's rows aligned to 128, when the precision policy runs
    the experts in fp8); overflowing assignments are dropped (contribute zero) and counted.

Returned statistics: per-expert load (assignments of real tokens), the sequence-wise balance
loss L_bal = sum_i f_i P_i averaged over rows (eqs. 17-20; multiplied by alpha in training),
and the number of dropped assignments.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.model.config import ModelConfig
from frontier_jax.model.expert_compute import (
    capacity_slots, collect, combine, dispatch, dropless_slots, swiglu_batched,
    swiglu_grouped)
from frontier_jax.kernels.grouped_gemm import TILE_ROWS, padded_rows_bound
from frontier_jax.model.grouped_matmul import fp8_experts, row_alignment
from frontier_jax.model.layers import normal_param
from frontier_jax.model.mlp import SwiGLU
from frontier_jax.model.routing import Router, Routing
from frontier_jax.parallel.expert import expert_parallel_ffn, expert_parallel_size
from frontier_jax.parallel.rules import active_sharding, constrain
from frontier_jax.precision import PrecisionPolicy


class MoEStats(NamedTuple):
    load: jax.Array  # [N_r] assignments per expert (fp32, real tokens only)
    balance_loss: jax.Array  # scalar, sequence-wise L_bal without alpha
    dropped: jax.Array  # scalar, assignments dropped by the capacity limit
    groups_per_token: jax.Array  # scalar, mean number of distinct expert groups a token reaches
    a2a_bytes: jax.Array  # scalar, bytes sent to other devices by the expert all-to-alls


def sequence_balance_loss(routing: Routing, token_mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """L_bal averaged over rows.  token_mask [B, T]; routing arrays flattened over B*T.

    Per row with T' real tokens: f_i = N_r / (K T') sum_t 1[i in TopK_t],
    P_i = (1/T') sum_t s_{i,t} / sum_j s_{j,t},  L = sum_i f_i P_i."""
    b, t = token_mask.shape
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    mask = token_mask.astype(jnp.float32)
    chosen = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32).sum(1).reshape(b, t, e)
    normed = (routing.scores / routing.scores.sum(-1, keepdims=True)).reshape(b, t, e)
    n_tok = jnp.maximum(mask.sum(1), 1.0)[:, None]
    f = e / k * (chosen * mask[..., None]).sum(1) / n_tok
    p = (normed * mask[..., None]).sum(1) / n_tok
    return jnp.mean((f * p).sum(-1))


def groups_per_token(experts: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean over tokens of the number of distinct expert groups among its K experts [N, K]."""
    groups = jax.nn.one_hot(experts // (cfg.n_routed_experts // cfg.n_group), cfg.n_group)
    return jnp.mean(jnp.sum(groups.max(axis=1), axis=-1))


class RoutedExperts(nnx.Module):
    """N_r SwiGLU experts as stacked weights, with both dispatch modes."""

    def __init__(self, cfg: ModelConfig, *, policy: PrecisionPolicy, rngs: nnx.Rngs):
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_ffn_dim
        self.cfg, self.policy = cfg, policy
        self.w_gate = normal_param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg.init_std)
        self.w_up = normal_param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg.init_std)
        self.w_down = normal_param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), cfg.init_std)

    def __call__(self, x: jax.Array, routing: Routing) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N, d] -> (sum_k g_k FFN_{e_k}(x) [N, d], dropped assignments, all-to-all bytes).

        Inside `use_sharding` with an `expert` mesh axis > 1, tokens travel to the devices
        owning their experts (`frontier_jax.parallel.expert`); otherwise all runs locally."""
        active = active_sharding()
        if active is not None and expert_parallel_size(*active) > 1:
            return expert_parallel_ffn(x, routing, self.w_gate[...], self.w_up[...], self.w_down[...],
                                       cfg=self.cfg, policy=self.policy, mesh=active[0], rules=active[1])
        n, d = x.shape
        e, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        weights = (self.w_gate[...], self.w_up[...], self.w_down[...])
        dtype = self.policy.compute_dtype
        flat_expert = routing.experts.reshape(-1)  # [N K]
        if self.cfg.moe_dispatch == "dropless":
            align = row_alignment(self.cfg.gmm_impl, self.policy)
            slot, sizes = dropless_slots(flat_expert, e, align)
            buf = dispatch(x.astype(dtype), slot, padded_rows_bound(n * k, e, align))
            out = swiglu_grouped(buf, sizes, *weights, impl=self.cfg.gmm_impl, dtype=dtype,
                                 policy=self.policy)
            dropped = jnp.zeros((), jnp.int32)
        else:
            capacity = math.ceil(self.cfg.moe_capacity_factor * n * k / e)
            if fp8_experts(self.policy):  # fp8 grouped GEMMs over equal, tile-aligned groups
                stride = -(-capacity // TILE_ROWS) * TILE_ROWS
                slot, keep = capacity_slots(flat_expert, e, capacity, stride)
                out = swiglu_grouped(dispatch(x.astype(dtype), slot, e * stride),
                                     jnp.full((e,), stride, jnp.int32), *weights,
                                     impl=self.cfg.gmm_impl, dtype=dtype, policy=self.policy)
            else:
                slot, keep = capacity_slots(flat_expert, e, capacity)
                buf = dispatch(x.astype(dtype), slot, e * capacity).reshape(e, capacity, d)
                out = swiglu_batched(buf, *weights, dtype=dtype).reshape(e * capacity, d)
            dropped = (n * k - keep.sum()).astype(jnp.int32)
        y = combine(collect(out, slot), routing.weights)
        return y.astype(x.dtype), dropped, jnp.zeros((), jnp.float32)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, policy: PrecisionPolicy, rngs: nnx.Rngs):
        self.cfg = cfg
        self.router = Router(cfg, rngs=rngs)
        self.experts = RoutedExperts(cfg, policy=policy, rngs=rngs)
        if cfg.n_shared_experts:
            self.shared = SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_ffn_dim,
                                 std=cfg.init_std, policy=policy, rngs=rngs, name="moe.shared")

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, MoEStats]:
        """x [B, T, d], token_mask [B, T] (1 = real token) -> ([B, T, d], MoEStats)."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        routing = self.router(flat)
        routed, dropped, a2a_bytes = self.experts(flat, routing)
        y = routed.reshape(b, t, d)
        if self.cfg.n_shared_experts:
            y = y + self.shared(x)
        load = jnp.zeros((self.cfg.n_routed_experts,), jnp.float32).at[routing.experts].add(
            jnp.broadcast_to(token_mask.reshape(-1, 1), routing.experts.shape).astype(jnp.float32))
        stats = MoEStats(load, sequence_balance_loss(routing, token_mask, self.cfg), dropped,
                         groups_per_token(routing.experts, self.cfg), a2a_bytes)
        return constrain(y, ("batch", "seq", "embed")), stats
