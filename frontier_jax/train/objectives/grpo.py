"""GRPO and its variants: the clipped policy-gradient objective over sampled completions.

A batch row holds one prompt and one sampled completion (rows of a group are its G samples);
`completion_mask` m_t is 1 where the target y_t is a completion token that trains.  With the
policy's log-probabilities at the rollout temperature T (`log softmax(z / T)`, computed in
vocabulary chunks, `model.logprobs`), per completion token t of row i

    d_t     = logp_t - logp_old_t                    (logp_old: the policy before this batch's first update)
    r_t     = exp(d_t),   clip(r) = min(max(r, 1 - eps_low), 1 + eps_high)
    l_t     = -w_t min(r_t A_t, clip(r_t) A_t) + beta k3_t
    k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (KL to the frozen reference; beta 0: none)
    w_t     = min(exp(logp_old_t - logp_sampler_t), C)        (truncated importance sampling, tis_cap C;
                                                              1 without it; no gradient)

`gspo` replaces r_t by the sequence ratio s_i = exp(sum_t m_t d_t / |y_i|), entering each token as
sg(s_i) exp(logp_t - sg(logp_t)) (its value s_i, its gradient s_i grad logp_t: GSPO-token).  The
loss aggregates l over the WHOLE global batch (so micro-batches add up to it):

    grpo     (1/N) sum_i (1/|y_i|) sum_t m_t l_t           N: rows with a completion token that trains
    gspo     as grpo
    dapo     sum_i sum_t m_t l_t / sum_i |y_i|             (token mean)
    dr_grpo  sum_i sum_t m_t l_t / (R L_max)               R: rows in use, L_max: max_completion_tokens

Reported (completion tokens): kl (mean k3), entropy (mean of H(softmax(z / T)), from the same
chunked pass), clip_low / clip_high (share of tokens whose clipped term is the minimum: r < 1 -
eps_low with A < 0, r > 1 + eps_high with A > 0), ratio (mean r), tokens.  No balance loss is added;
the MoE layers' expert loads feed the loss-free bias update as in pre-training (train.bias_update_speed,
which the GRPO configs set to 0: the biases stay frozen).  The MTP modules are not trained (the forward
skips them).

Routing replay (routing_replay): the batch carries routed_experts [B, T, L_moe, k] int32, the
experts the sampler routed each input token to (prompt tokens included), and every MoE layer of
the training forward runs each token on those experts; the gate weights still come from the
current router's scores, so the router keeps learning through them.  The routing bias only
selects experts, so under replay it has no effect on the training forward (it still steers the
sampler's choices); the loads the bias update would read are the replayed experts'.

State (`TrainState.extra`): with beta > 0 the reference parameters {"reference": params}, a copy
of the starting policy, reset to the policy every `ref_reset_every` steps (0: never); the reference
log-probabilities come with the batch (`ref_logprobs`, computed by the rollout source from these
parameters).  With beta = 0 nothing is kept and no reference forward runs.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.model import ModelConfig, Transformer
from frontier_jax.model.block import SequenceInputs
from frontier_jax.model.head import OutputHead, require_lm_head
from frontier_jax.model.moe import MoEStats
from frontier_jax.runtime.logprobs import VOCAB_CHUNK


class LossAgg(enum.StrEnum):
    grpo = "grpo"
    dapo = "dapo"
    dr_grpo = "dr_grpo"
    gspo = "gspo"


@dataclass
class GRPOLossConfig:
    """The loss fields of the `grpo:` section (the rollout fields extend it in `posttrain.config`).

    group_size: samples per prompt G; temperature: the rollout temperature T (log-probabilities are
    of softmax(z / T)); max_completion_tokens: L_max (dr_grpo's divisor); loss_agg; eps_low /
    eps_high: the clip range [1 - eps_low, 1 + eps_high]; beta: the KL coefficient (0: no
    reference); ref_reset_every: reset the reference to the policy every N steps (0: never);
    tis_cap: C of truncated importance sampling with the sampler's log-probabilities (0: off);
    routing_replay: the training forward uses the experts the sampler routed each token to."""

    group_size: int = 8
    temperature: float = 1.0
    max_completion_tokens: int = 64
    loss_agg: LossAgg = LossAgg.grpo
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    ref_reset_every: int = 0
    tis_cap: float = 0.0
    routing_replay: bool = False

    def validate(self) -> GRPOLossConfig:
        if self.group_size < 2:
            raise ValueError(
                f"grpo.group_size={self.group_size} must be >= 2: advantages compare the samples of a group"
            )
        if not self.temperature > 0:
            raise ValueError(
                f"grpo.temperature={self.temperature} must be > 0 (the ratio reads softmax(z / T))"
            )
        if self.max_completion_tokens < 1:
            raise ValueError(f"grpo.max_completion_tokens={self.max_completion_tokens} must be >= 1")
        for name in ("eps_low", "eps_high"):
            if not 0 <= getattr(self, name):
                raise ValueError(f"grpo.{name}={getattr(self, name)} must be >= 0")
        if self.eps_low >= 1:
            raise ValueError(
                f"grpo.eps_low={self.eps_low} must be < 1 (the clip range starts at 1 - eps_low > 0)"
            )
        if self.beta < 0 or self.ref_reset_every < 0 or self.tis_cap < 0:
            raise ValueError("grpo.beta, grpo.ref_reset_every and grpo.tis_cap must be >= 0 (0: off)")
        if self.ref_reset_every and not self.beta:
            raise ValueError(
                "grpo.ref_reset_every needs a reference: set grpo.beta > 0, or leave ref_reset_every=0"
            )
        return self


BASE_SPEC: dict[str, np.dtype] = {
    **{k: np.dtype(np.int32) for k in ("input_ids", "positions", "segment_ids", "targets")},
    **{k: np.dtype(np.float32) for k in ("completion_mask", "advantages", "old_logprobs")},
}


def batch_spec(loss: GRPOLossConfig) -> dict[str, np.dtype]:
    """The batch keys (each [B, T]) the objective of `loss` reads: BASE_SPEC, `sampler_logprobs`
    with tis_cap, `ref_logprobs` with beta, `routed_experts` [B, T, L_moe, k] with routing replay."""
    spec = dict(BASE_SPEC)
    if loss.tis_cap:
        spec["sampler_logprobs"] = np.dtype(np.float32)
    if loss.beta:
        spec["ref_logprobs"] = np.dtype(np.float32)
    if loss.routing_replay:
        spec["routed_experts"] = np.dtype(np.int32)
    return spec


class GRPOBatch(NamedTuple):
    """The prepared batch (`GRPO.prepare`): each [B, T]; the optional keys None when not read."""

    input_ids: jax.Array
    positions: jax.Array
    segment_ids: jax.Array  # 1 on a row's tokens, 0 = padding
    targets: jax.Array
    completion_mask: jax.Array  # fp32, 1 on the completion tokens that train
    advantages: jax.Array  # fp32, per token (a row's advantage on its completion tokens)
    old_logprobs: jax.Array
    sampler_logprobs: jax.Array | None = None
    ref_logprobs: jax.Array | None = None
    routed_experts: jax.Array | None = None  # [B, T, L_moe, k] int32


def k3(ref: jax.Array, logp: jax.Array) -> jax.Array:
    """The k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref - logp
    return jnp.exp(delta) - delta - 1


def token_losses(
    logp: jax.Array, batch: GRPOBatch, loss: GRPOLossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(l [B, T] of the module docstring, per-token figures {ratio, clip_low, clip_high, kl}) from the
    policy's log-probabilities logp [B, T] fp32 and the batch (masked positions carry anything)."""
    mask, adv = batch.completion_mask, batch.advantages
    log_ratio = logp - batch.old_logprobs
    if loss.loss_agg == LossAgg.gspo:
        lengths = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
        seq = jnp.exp((log_ratio * mask).sum(-1, keepdims=True) / lengths)  # s_i [B, 1]
        ratio = jax.lax.stop_gradient(seq) * jnp.exp(logp - jax.lax.stop_gradient(logp))
    else:
        ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1 - loss.eps_low, 1 + loss.eps_high)
    surrogate = jnp.minimum(ratio * adv, clipped * adv)
    if loss.tis_cap:
        weight = jnp.minimum(jnp.exp(batch.old_logprobs - batch.sampler_logprobs), loss.tis_cap)
        surrogate = jax.lax.stop_gradient(weight) * surrogate
    per_token = -surrogate
    figures = {
        "ratio": jax.lax.stop_gradient(ratio),
        "clip_low": ((ratio < 1 - loss.eps_low) & (adv < 0)).astype(jnp.float32),
        "clip_high": ((ratio > 1 + loss.eps_high) & (adv > 0)).astype(jnp.float32),
    }
    if loss.beta:
        kl = k3(batch.ref_logprobs, logp)
        per_token = per_token + loss.beta * kl
        figures["kl"] = jax.lax.stop_gradient(kl)
    return per_token, figures


def aggregate(
    per_token: jax.Array, mask: jax.Array, loss: GRPOLossConfig, norm: Mapping[str, jax.Array]
) -> jax.Array:
    """The loss_agg of the module docstring over these rows, normalised by counts of the whole batch."""
    masked = per_token * mask
    if loss.loss_agg in (LossAgg.grpo, LossAgg.gspo):
        return (masked.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).sum() / norm["sequences"]
    if loss.loss_agg == LossAgg.dapo:
        return masked.sum() / norm["tokens"]
    return masked.sum() / (norm["rows"] * loss.max_completion_tokens)


class GRPO:
    """The objective of `frontier-jax grpo` (module docstring), a `StagedObjective`."""

    def __init__(self, loss: GRPOLossConfig, model: ModelConfig, *, vocab_chunk: int = VOCAB_CHUNK):
        require_lm_head(model, "GRPO")
        self.loss, self.vocab_chunk = loss.validate(), vocab_chunk
        self.batch_spec = batch_spec(loss)

    # ------------------------------------------------------------------ state: the reference
    def init_extra(self, params: dict, biases: dict) -> dict:
        """{"reference": a copy of the starting parameters} with beta > 0, else {}."""
        return {"reference": jax.tree.map(jnp.copy, params)} if self.loss.beta else {}

    def extra_shardings(self, param_shardings: dict, bias_shardings: dict) -> dict:
        return {"reference": param_shardings} if self.loss.beta else {}

    def next_extra(self, extra: dict, params: dict, step: jax.Array) -> dict:
        """After update `step` (1-based): the reference reset to the policy every ref_reset_every steps."""
        every = self.loss.ref_reset_every
        if not every or not extra:
            return extra
        reset = step % every == 0
        return {"reference": jax.tree.map(lambda p, r: jnp.where(reset, p, r), params, extra["reference"])}

    # ------------------------------------------------------------------ batch
    def prepare(self, batch: Mapping[str, jax.Array], extra: Any) -> GRPOBatch:
        """The batch with completion_mask 0 on padding rows and positions (segment 0)."""
        prepared = GRPOBatch(**{k: batch.get(k) for k in GRPOBatch._fields})
        return prepared._replace(completion_mask=batch["completion_mask"] * (batch["segment_ids"] != 0))

    def normalisers(self, batch: GRPOBatch, micro_batches: int) -> dict:
        """tokens: completion tokens that train; sequences: rows holding one; rows: rows in use."""
        mask = batch.completion_mask
        return {
            "tokens": jnp.maximum(mask.sum(), 1.0),
            "sequences": jnp.maximum((mask.sum(-1) > 0).sum(), 1).astype(jnp.float32),
            "rows": jnp.maximum((batch.segment_ids != 0).any(-1).sum(), 1).astype(jnp.float32),
        }

    # ------------------------------------------------------------------ the loss
    def __call__(self, model: Transformer, mb: GRPOBatch, norm: dict) -> tuple[jax.Array, dict, dict]:
        inputs = self.sequence_inputs(mb)
        out = model.hidden(
            mb.input_ids,
            inputs.positions,
            inputs.segment_ids,
            token_mask=inputs.token_mask,
            with_mtp=False,
            routed_experts=inputs.routed_experts,
        )
        loss, metrics = self.output_terms(out.hidden, None, model.output_head(), mb, norm)
        return loss, metrics, model.expert_loads(out)

    def sequence_inputs(self, mb: GRPOBatch) -> SequenceInputs:
        """Positions, the row's document id (one sequence per row, 0 = padding), real tokens, and
        with routing replay the sampler's experts (every path of the forward reads them here:
        the micro-batch forward and the pipeline stages alike)."""
        return SequenceInputs(
            mb.positions, mb.segment_ids, (mb.segment_ids != 0).astype(jnp.int32), mb.routed_experts
        )

    def output_terms(
        self, hidden: jax.Array, mtp_hidden: jax.Array | None, head: OutputHead, mb: GRPOBatch, norm: dict
    ) -> tuple[jax.Array, dict]:
        """(loss, sums of the reported figures) from the final-normed hidden state g [B, T, d]
        (the MTP depths' g^k are not trained: ignored)."""
        stats = head.token_stats(
            hidden, mb.targets, chunk=self.vocab_chunk, temperature=self.loss.temperature
        )
        per_token, figures = token_losses(stats.logprob, mb, self.loss)
        mask = mb.completion_mask
        loss = aggregate(per_token, mask, self.loss, norm)
        figures["entropy"] = stats.entropy
        metrics = {f"{name}_sum": jnp.sum(value * mask) for name, value in figures.items()}
        return loss, metrics

    def routing_terms(self, stats: Sequence[MoEStats | None], norm: dict) -> tuple[jax.Array, dict]:
        """No routing loss in GRPO (the expert loads still feed the bias update)."""
        return jnp.zeros((), jnp.float32), {}

    def summarize(self, metrics: dict, norm: dict) -> dict:
        tokens = norm["tokens"]
        out = {name.removesuffix("_sum"): value / tokens for name, value in metrics.items()}
        out["tokens"] = tokens
        return out
