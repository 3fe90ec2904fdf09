"""DeepSeekMoE routing (V3 report, Sec. 2.1.2, eqs. 12-16) with auxiliary-loss-free balancing.

For token u_t [d] and N_r routed experts with centroids e_i (router weight W_r [d, N_r]):
  s_{i,t} = sigmoid(u_t . e_i)            (V3; softmax over experts for V2-style models)
  selection uses the biased score s_{i,t} + b_i (b = per-expert bias, state, never a gradient):
    group-limited routing: experts form G groups; a group's score is the sum of its two
    largest biased scores (max for softmax scoring); only the top-M groups are eligible;
    then the top-K_r eligible experts by biased score are chosen.
  gates use the unbiased scores: g_{i,t} = s_{i,t} / sum_{j in topK} s_{j,t} (when normalised),
  times the routed scaling factor.

Routing replay (`route(..., experts=E)`): the selection is given, E [N, K_r] (e.g. the experts an
inference engine routed each token to when it sampled it), and only the gates are computed from
the current router, g_{i,t} as above over i in E_t: the router still receives gradients through
the gates (and the balance loss), while the experts that run are the given ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.model.config import ModelConfig
from frontier_jax.model.layers import normal_param
from frontier_jax.ops.routing import Routing


class ExpertBias(nnx.Variable):
    """Per-expert routing bias b [N_r]: updated by the balancing rule, not by gradients."""


def route(logits: jax.Array, bias: jax.Array, cfg: ModelConfig, experts: jax.Array | None = None) -> Routing:
    """logits [N, N_r] (fp32), bias [N_r] -> Routing; experts [N, K_r] int32: the selection to
    replay instead of choosing one (module docstring; ids in [0, N_r), not checked), or None."""
    if cfg.scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
    if experts is None:
        experts = select_experts(scores + bias, cfg)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores)


def select_experts(choice: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The K_r experts [N, K_r] of each token by biased score choice [N, N_r] = s + b, within its
    top-M groups under group-limited routing (module docstring)."""
    n, e = choice.shape
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
        if cfg.scoring_func == "sigmoid":
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_scores = grouped.max(-1)
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jax.nn.one_hot(top_groups, cfg.n_group, dtype=jnp.int32).sum(1) > 0
        expert_mask = jnp.repeat(group_mask, e // cfg.n_group, axis=1)
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    return jax.lax.top_k(choice, cfg.num_experts_per_tok)[1]


class Router(nnx.Module):
    """Router weight W_r [d, N_r] (fp32) and the selection bias b [N_r]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kernel = normal_param(
            rngs, (cfg.hidden_size, cfg.n_routed_experts), ("embed", "expert"), cfg.init_std
        )
        self.bias = ExpertBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), logical_axes=("expert",))

    def __call__(self, x: jax.Array, experts: jax.Array | None = None) -> Routing:
        """x [N, d] -> Routing; logits are computed in fp32; experts [N, K_r]: a selection to
        replay (`route`)."""
        logits = jnp.dot(x.astype(jnp.float32), self.kernel[...])
        return route(logits, self.bias[...], self.cfg, experts)
