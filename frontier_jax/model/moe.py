"""DeepSeekMoE layer (V3 report, eq. 12):

    h'_t = u_t + sum_{i<=N_s} FFN_i^(s)(u_t) + sum_{i<=N_r} g_{i,t} FFN_i^(r)(u_t)

Shared experts are one SwiGLU of width N_s * f.  Routed experts are SwiGLUs stacked as
W_gate, W_up [N_r, d, f] and W_down [N_r, f, d].  Token dispatch (`model.moe_dispatch`):
  * "dropless": the N*K (token, expert) assignments are sorted by expert and run through one
    grouped matmul (`grouped_matmul`), then unsorted and combined with the gates.
  * "capacity": each expert takes at most C = ceil(capacity_factor * N K / N_r) assignments
    (first come, in token order) into an [N_r, C, d] buffer computed by a batched matmul;
    overflowing assignments are dropped (contribute zero) and counted.

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
from frontier_jax.model.grouped_matmul import grouped_matmul
from frontier_jax.model.layers import normal_param
from frontier_jax.model.mlp import SwiGLU
from frontier_jax.model.routing import Router, Routing
from frontier_jax.parallel.rules import constrain
from frontier_jax.precision import PrecisionPolicy


class MoEStats(NamedTuple):
    load: jax.Array  # [N_r] assignments per expert (fp32, real tokens only)
    balance_loss: jax.Array  # scalar, sequence-wise L_bal without alpha
    dropped: jax.Array  # scalar, assignments dropped by the capacity limit


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


class RoutedExperts(nnx.Module):
    """N_r SwiGLU experts as stacked weights, with both dispatch modes."""

    def __init__(self, cfg: ModelConfig, *, policy: PrecisionPolicy, rngs: nnx.Rngs):
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_ffn_dim
        self.cfg, self.policy = cfg, policy
        self.w_gate = normal_param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg.init_std)
        self.w_up = normal_param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), cfg.init_std)
        self.w_down = normal_param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), cfg.init_std)

    def _gmm_swiglu(self, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        gmm = lambda a, w: grouped_matmul(a, w[...], group_sizes, impl=self.cfg.gmm_impl,
                                          dtype=self.policy.compute_dtype)
        return gmm(jax.nn.silu(gmm(xs, self.w_gate)) * gmm(xs, self.w_up), self.w_down)

    def _batched_swiglu(self, xb: jax.Array) -> jax.Array:
        dt = self.policy.compute_dtype
        mm = lambda a, w, eq: jnp.einsum(eq, a.astype(dt), w[...].astype(dt),
                                         preferred_element_type=jnp.float32).astype(dt)
        h = jax.nn.silu(mm(xb, self.w_gate, "ecd,edf->ecf")) * mm(xb, self.w_up, "ecd,edf->ecf")
        return mm(h, self.w_down, "ecf,efd->ecd")

    def __call__(self, x: jax.Array, routing: Routing) -> tuple[jax.Array, jax.Array]:
        """x [N, d] -> (sum_k g_k FFN_{e_k}(x) [N, d], dropped assignments)."""
        n, d = x.shape
        e, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        flat_expert = routing.experts.reshape(-1)  # [N K]
        order = jnp.argsort(flat_expert, stable=True)
        sorted_expert = flat_expert[order]
        xs = x[order // k]  # [N K, d] sorted by expert
        group_sizes = jnp.bincount(flat_expert, length=e)
        if self.cfg.moe_dispatch == "dropless":
            ys = self._gmm_swiglu(xs, group_sizes)
            dropped = jnp.zeros((), jnp.int32)
        else:
            capacity = math.ceil(self.cfg.moe_capacity_factor * n * k / e)
            group_start = jnp.cumsum(group_sizes) - group_sizes
            rank = jnp.arange(n * k) - group_start[sorted_expert]
            keep = rank < capacity
            slot = jnp.where(keep, sorted_expert * capacity + rank, e * capacity)
            buf = jnp.zeros((e * capacity + 1, d), x.dtype).at[slot].set(xs)
            out = self._batched_swiglu(buf[:-1].reshape(e, capacity, d)).reshape(e * capacity, d)
            ys = jnp.concatenate([out, jnp.zeros((1, d), out.dtype)])[slot]
            dropped = (n * k - keep.sum()).astype(jnp.int32)
        unsort = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
        y_assign = ys[unsort].reshape(n, k, d)  # back to (token, choice) order
        y = jnp.einsum("nkd,nk->nd", y_assign, routing.weights.astype(ys.dtype),
                       preferred_element_type=jnp.float32)
        return y.astype(x.dtype), dropped


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
        routed, dropped = self.experts(flat, routing)
        y = routed.reshape(b, t, d)
        if self.cfg.n_shared_experts:
            y = y + self.shared(x)
        load = jnp.zeros((self.cfg.n_routed_experts,), jnp.float32).at[routing.experts].add(
            jnp.broadcast_to(token_mask.reshape(-1, 1), routing.experts.shape).astype(jnp.float32))
        stats = MoEStats(load, sequence_balance_loss(routing, token_mask, self.cfg), dropped)
        return constrain(y, ("batch", "seq", "embed")), stats
