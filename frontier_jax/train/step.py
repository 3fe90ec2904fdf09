"""The pure training step: `train_step(state, batch) -> (state, metrics)`.

State (a pytree of arrays, checkpointed whole):
    params     fp32 master weights (pure dict mirroring the NNX module tree)
    biases     per-MoE-layer expert selection biases b [L, N_r] (state, not trained)
    opt_state  AdamW moments (fp32 or bf16)
    step       int32
    rng        PRNG key data (for stochastic features; checkpointed for exact resume)

One step, for a global batch split into M micro-batches (scanned, gradients summed):
    L = L_CE + lambda L_MTP + alpha sum_layers L_Bal + z L_z
where every term is normalised by counts of the WHOLE global batch (tokens, MTP targets per
depth, micro-batches), so accumulation equals one large batch up to fp32 rounding.  Then
AdamW, and the auxiliary-loss-free bias update per MoE layer (V3 report Sec. 2.1.2):
    b_i <- b_i + gamma * sign(mean_j load_j - load_i)
A step whose loss or gradient norm is not finite leaves the state unchanged (`finite` = 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from frontier_jax.model import Transformer
from frontier_jax.model.routing import ExpertBias
from frontier_jax.parallel.expert import expert_dispatcher
from frontier_jax.parallel.rules import RULE_SETS, use_sharding
from frontier_jax.precision import get_policy
from frontier_jax.train.losses import masked_sum, mtp_targets, token_cross_entropy
from frontier_jax.train.optimizer import batch_size_at, build_optimizer, learning_rate_schedule

if TYPE_CHECKING:  # the composed config sits above train
    from frontier_jax.config import Config

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


class Batch(NamedTuple):
    input_ids: jax.Array  # [B, T] int32
    targets: jax.Array  # [B, T] int32, next token
    loss_mask: jax.Array  # [B, T] int32
    segment_ids: jax.Array  # [B, T] int32, 0 = padding
    positions: jax.Array  # [B, T] int32
    token_mask: jax.Array  # [B, T] int32, real tokens of rows in use (routing statistics)


def _bias_update(biases: dict, loads: dict, gamma: float) -> dict:
    """b <- b + gamma * sign(mean(load) - load), per layer (rows of [L, N_r])."""
    def update(b, load):
        return b + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)

    return jax.tree.map(update, biases, loads)


def _bias_tree(template: dict, main_load, mtp_load) -> dict:
    """Places per-layer loads at the paths of the biases they update."""
    out = {}
    if "moe_layers" in template:
        out["moe_layers"] = {"blocks": {"ffn": {"router": {"bias": main_load}}}}
    if "mtp" in template:
        out["mtp"] = {"modules": {"block": {"ffn": {"router": {"bias": mtp_load}}}}}
    return out


class Trainer:
    """Builds the model's abstract structure once and exposes pure `init` / `train_step`."""

    def __init__(self, cfg: Config, mesh: Mesh | None = None):
        """mesh: when given, activations are constrained to it by the `cfg.mesh.rules` table."""
        self.cfg = cfg
        self.mesh = mesh
        self.rules = RULE_SETS[cfg.mesh.rules]
        self.policy = get_policy(cfg.precision.policy)
        experts = expert_dispatcher(mesh, self.rules)  # all-to-all where the mesh splits the experts
        abstract = nnx.eval_shape(lambda: Transformer(cfg.model, policy=self.policy, experts=experts,
                                                      rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_params, self.abstract_biases = nnx.split(abstract, nnx.Param, ExpertBias)
        decay_mask = jax.tree.map(
            lambda v: "norm" not in v.get_metadata()["logical_axes"], self.abstract_params,
            is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.optimizer = build_optimizer(cfg.train, nnx.to_pure_dict(decay_mask))
        self.schedule = learning_rate_schedule(cfg.train)

    # ------------------------------------------------------------------ state
    def init(self, seed: int) -> dict[str, Any]:
        model = Transformer(self.cfg.model, policy=self.policy, rngs=nnx.Rngs(seed))
        _, params, biases = nnx.split(model, nnx.Param, ExpertBias)
        params, biases = nnx.to_pure_dict(params), nnx.to_pure_dict(biases)
        return {
            "params": params,
            "biases": biases,
            "opt_state": self.optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
        }

    def model(self, params: dict, biases: dict) -> Transformer:
        return nnx.merge(self.graphdef, params, biases)

    # ------------------------------------------------------------------- loss
    def _micro_loss(self, params, biases, mb: Batch, norm: dict):
        cfg = self.cfg
        segment_ids = mb.segment_ids if cfg.data.mask_documents else None
        out = self.model(params, biases).forward(mb.input_ids, mb.positions, segment_ids,
                                                 token_mask=mb.token_mask)
        ce, lse = token_cross_entropy(out.logits, mb.targets)
        ce_sum = masked_sum(ce, mb.loss_mask)
        loss = ce_sum / norm["tokens"]
        metrics = {"ce_sum": ce_sum}
        if cfg.train.z_loss:
            z_sum = masked_sum(lse * lse, mb.loss_mask)
            loss += cfg.train.z_loss * z_sum / norm["tokens"]
            metrics["z_sum"] = z_sum
        if out.mtp_logits is not None:
            targets, masks = mtp_targets(mb.targets, mb.loss_mask, segment_ids, cfg.model.mtp_depth)
            mtp_ce, _ = token_cross_entropy(out.mtp_logits, targets)
            per_depth = jnp.sum(mtp_ce * masks, axis=(1, 2))  # [D]
            mtp_loss = jnp.sum(per_depth / norm["mtp_targets"]) / cfg.model.mtp_depth
            loss += cfg.train.mtp_lambda * mtp_loss
            metrics["mtp_loss"] = mtp_loss
        layers = [stats for stats in (out.moe_stats, out.mtp_stats) if stats is not None]
        total = lambda field: sum(getattr(stats, field).sum() for stats in layers) if layers else jnp.zeros(())
        balance = total("balance_loss") / norm["micro_batches"]
        loss += cfg.train.balance_alpha * balance
        n_layers = sum(stats.load.shape[0] for stats in layers)
        metrics.update(balance_loss=balance, dropped=total("dropped"), a2a_bytes=total("a2a_bytes"),
                       groups_per_token=total("groups_per_token") / max(n_layers, 1) / norm["micro_batches"])
        main_load = None if out.moe_stats is None else out.moe_stats.load
        mtp_load = None if out.mtp_stats is None else out.mtp_stats.load
        return loss, (metrics, _bias_tree(biases, main_load, mtp_load))

    # ------------------------------------------------------------------- step
    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        if self.mesh is None:
            return self._train_step(state, batch)
        with use_sharding(self.mesh, self.rules):
            return self._train_step(state, batch)

    def _train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        cfg = self.cfg.train
        b = batch["input_ids"].shape[0]
        m = cfg.micro_batches
        rows = batch_size_at(cfg, state["step"])
        active_rows = (jnp.arange(b) < rows)[:, None].astype(batch["loss_mask"].dtype)
        full = Batch(*(batch[k] * active_rows if k == "loss_mask" else batch[k] for k in BATCH_KEYS),
                     token_mask=(batch["segment_ids"] != 0).astype(jnp.int32) * active_rows)
        seg = full.segment_ids if self.cfg.data.mask_documents else None
        norm = {"tokens": jnp.maximum(full.loss_mask.sum(), 1).astype(jnp.float32),
                "micro_batches": jnp.float32(m)}
        if self.cfg.model.mtp_depth:
            _, masks = mtp_targets(full.targets, full.loss_mask, seg, self.cfg.model.mtp_depth)
            norm["mtp_targets"] = jnp.maximum(masks.sum((1, 2)), 1).astype(jnp.float32)
        micro = jax.tree.map(lambda x: x.reshape((m, b // m) + x.shape[1:]), full)

        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def accumulate(carry, mb):
            (loss, (metrics, loads)), grads = grad_fn(state["params"], state["biases"], mb, norm)
            return jax.tree.map(jnp.add, carry, (loss, metrics, loads, grads)), None

        (loss_shape, (metrics_shape, loads_shape)), grads_shape = jax.eval_shape(
            grad_fn, state["params"], state["biases"], jax.tree.map(lambda x: x[0], micro), norm)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             (loss_shape, metrics_shape, loads_shape, grads_shape))
        (loss, metrics, loads, grads), _ = jax.lax.scan(accumulate, zeros, micro)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"],
                                                   step=state["step"])
        params = optax.apply_updates(state["params"], updates)
        biases = _bias_update(state["biases"], loads, cfg.bias_update_speed)
        new_state = {"params": params, "biases": biases, "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": state["rng"]}
        kept = {k: v for k, v in state.items() if k != "step"}
        new_state.update(jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                      {k: new_state[k] for k in kept}, kept))

        ce = metrics["ce_sum"] / norm["tokens"]
        out = {"loss": loss, "ce_loss": ce, "perplexity": jnp.exp(ce), "grad_norm": grad_norm,
               "lr": self.schedule(state["step"]), "tokens": norm["tokens"], "batch_rows": rows,
               "finite": finite.astype(jnp.int32), "balance_loss": metrics["balance_loss"],
               "dropped": metrics["dropped"], "a2a_bytes": metrics["a2a_bytes"],
               "groups_per_token": metrics["groups_per_token"]}
        if "mtp_loss" in metrics:
            out["mtp_loss"] = metrics["mtp_loss"]
        if "z_sum" in metrics:
            out["z_loss"] = metrics["z_sum"] / norm["tokens"]
        for name, load in jax.tree_util.tree_leaves_with_path(loads):
            tag = "mtp" if "mtp" in jax.tree_util.keystr(name) else "moe"
            out[f"{tag}_load_max_over_mean"] = load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)
        for name, bias in jax.tree_util.tree_leaves_with_path(new_state["biases"]):
            tag = "mtp" if "mtp" in jax.tree_util.keystr(name) else "moe"
            out[f"{tag}_bias_range"] = bias.max(-1) - bias.min(-1)
        return new_state, out
