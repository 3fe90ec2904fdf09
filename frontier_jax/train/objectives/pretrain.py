"""Pre-training: next-token cross-entropy, z-loss, multi-token prediction and sequence balance.

    L = L_CE + lambda L_MTP + alpha sum_layers L_Bal + z L_z
per micro-batch, every term normalised by counts of the WHOLE global batch (tokens, MTP targets
per depth, rows with real tokens for L_Bal -- the mean over the rows the step trains on, rows
switched off by the batch-size ramp and empty rows excluded -- micro-batches), so that
accumulation equals one large batch up to fp32 rounding.  The rows in use are the rows holding
a real token (segment_ids != 0): the ramp's padding rows hold none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.model import ModelConfig, Transformer
from frontier_jax.model.block import SequenceInputs
from frontier_jax.model.head import OutputHead, require_lm_head
from frontier_jax.model.moe import MoEStats, rows_with_tokens
from frontier_jax.train.config import TrainConfig
from frontier_jax.train.losses import masked_sum, mtp_targets, token_cross_entropy

BATCH_SPEC: dict[str, np.dtype] = {
    k: np.dtype(np.int32) for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
}
BATCH_KEYS = tuple(BATCH_SPEC)


class TokenBatch(NamedTuple):
    input_ids: jax.Array  # [B, T] int32
    targets: jax.Array  # [B, T] int32, next token
    loss_mask: jax.Array  # [B, T] int32
    segment_ids: jax.Array  # [B, T] int32, 0 = padding
    positions: jax.Array  # [B, T] int32
    token_mask: jax.Array  # [B, T] int32, real tokens of rows in use (routing statistics)


class Pretrain:
    """The pre-training objective of the `train:` section (z_loss, mtp_lambda, balance_alpha), the
    `model:` section (mtp_depth, MoE layers) and data.mask_documents (document-masked attention
    and MTP targets)."""

    batch_spec = BATCH_SPEC

    def __init__(self, train: TrainConfig, model: ModelConfig, *, mask_documents: bool):
        require_lm_head(model, "the pre-training objective")
        self.train, self.model, self.mask_documents = train, model, mask_documents

    def _segments(self, batch: TokenBatch) -> jax.Array | None:
        return batch.segment_ids if self.mask_documents else None

    def prepare(self, batch: Mapping[str, jax.Array], extra: Any) -> TokenBatch:
        """Rows not in use (no real token: the batch-size ramp's padding) get a zero loss mask and
        no tokens in the routing statistics.  (Pre-training keeps no state: `extra` is {}.)"""
        active = (batch["segment_ids"] != 0).any(axis=1)[:, None].astype(batch["loss_mask"].dtype)
        return TokenBatch(
            *(batch[k] * active if k == "loss_mask" else batch[k] for k in BATCH_KEYS),
            token_mask=(batch["segment_ids"] != 0).astype(jnp.int32) * active,
        )

    def normalisers(self, batch: TokenBatch, micro_batches: int) -> dict:
        """tokens: loss-masked targets; mtp_targets [D]: targets per MTP depth; balance_rows:
        rows with real tokens (ramp-inactive and empty rows excluded; at least 1); batch_rows: the
        rows in use (int32, reported); micro_batches."""
        norm = {
            "tokens": jnp.maximum(batch.loss_mask.sum(), 1).astype(jnp.float32),
            "balance_rows": jnp.maximum(rows_with_tokens(batch.token_mask), 1).astype(jnp.float32),
            "batch_rows": rows_with_tokens(batch.token_mask),
            "micro_batches": jnp.float32(micro_batches),
        }
        if self.model.mtp_depth:
            _, masks = mtp_targets(
                batch.targets, batch.loss_mask, self._segments(batch), self.model.mtp_depth
            )
            norm["mtp_targets"] = jnp.maximum(masks.sum((1, 2)), 1).astype(jnp.float32)
        return norm

    def __call__(self, model: Transformer, mb: TokenBatch, norm: dict) -> tuple[jax.Array, dict, dict]:
        inputs = self.sequence_inputs(mb)
        out = model.hidden(mb.input_ids, inputs.positions, inputs.segment_ids, token_mask=inputs.token_mask)
        loss, metrics = self.output_terms(out.hidden, out.mtp_hidden, model.output_head(), mb, norm)
        routing_loss, routing = self.routing_terms([out.moe_stats, out.mtp_stats], norm)
        return loss + routing_loss, metrics | routing, model.expert_loads(out)

    # The parts of one micro-batch's loss, so that a pipeline can compute each where its inputs are.

    def sequence_inputs(self, mb: TokenBatch) -> SequenceInputs:
        """What every block reads: positions, document ids (data.mask_documents), token_mask."""
        return SequenceInputs(mb.positions, self._segments(mb), mb.token_mask)

    def output_terms(
        self, hidden: jax.Array, mtp_hidden: jax.Array | None, head: OutputHead, mb: TokenBatch, norm: dict
    ) -> tuple[jax.Array, dict]:
        """(L_CE + z L_z + lambda L_MTP, their metrics) from the logits [B, T, V] of the final-normed
        hidden state g [B, T, d] and those [D, B, T, V] of the MTP depths' g^k (None without MTP)."""
        train, depth = self.train, self.model.mtp_depth
        ce, lse = token_cross_entropy(head.logits(hidden), mb.targets)
        ce_sum = masked_sum(ce, mb.loss_mask)
        loss = ce_sum / norm["tokens"]
        metrics = {"ce_sum": ce_sum}
        if train.z_loss:
            z_sum = masked_sum(lse * lse, mb.loss_mask)
            loss += train.z_loss * z_sum / norm["tokens"]
            metrics["z_sum"] = z_sum
        if mtp_hidden is not None:
            targets, masks = mtp_targets(mb.targets, mb.loss_mask, self._segments(mb), depth)
            mtp_ce, _ = token_cross_entropy(head.logits(mtp_hidden), targets)
            per_depth = jnp.sum(mtp_ce * masks, axis=(1, 2))  # [D]
            mtp_loss = jnp.sum(per_depth / norm["mtp_targets"]) / depth
            loss += train.mtp_lambda * mtp_loss
            metrics["mtp_loss"] = mtp_loss
        return loss, metrics

    def routing_terms(self, stats: Sequence[MoEStats | None], norm: dict) -> tuple[jax.Array, dict]:
        """(alpha sum_layers L_Bal / balance_rows, routing metrics) of MoE layers' statistics
        (stacks [L, ...]; None entries skipped).  Additive over disjoint sets of layers and over
        micro-batches: groups_per_token is divided by the model's count of MoE layers (main + MTP)."""
        layers = [s for s in stats if s is not None]
        total = lambda field: sum(getattr(s, field).sum() for s in layers) if layers else jnp.zeros(())  # noqa: E731
        balance = total("balance_loss") / norm["balance_rows"]
        n_layers = self.model.num_moe_layers + self.model.mtp_depth
        metrics = dict(
            balance_loss=balance,
            dropped=total("dropped"),
            a2a_bytes=total("a2a_bytes"),
            groups_per_token=total("groups_per_token") / max(n_layers, 1) / norm["micro_batches"],
        )
        return self.train.balance_alpha * balance, metrics

    def summarize(self, metrics: dict, norm: dict) -> dict:
        ce = metrics["ce_sum"] / norm["tokens"]
        out = {"ce_loss": ce, "perplexity": jnp.exp(ce), "tokens": norm["tokens"]}
        out["batch_rows"] = norm["batch_rows"]
        out.update({k: metrics[k] for k in ("balance_loss", "dropped", "a2a_bytes", "groups_per_token")})
        if "mtp_loss" in metrics:
            out["mtp_loss"] = metrics["mtp_loss"]
        if "z_sum" in metrics:
            out["z_loss"] = metrics["z_sum"] / norm["tokens"]
        return out
