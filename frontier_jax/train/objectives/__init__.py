"""Training objectives: what a step minimises, given the model and a batch.

An objective is called once per micro-batch,
    objective(model, batch, normalisers) -> (loss, metrics, aux)
with `batch` a pytree of [B_micro, ...] arrays, `normalisers` computed once from the WHOLE global
batch (so that summing the micro-batch losses equals the loss of one large batch), `metrics` and
`aux` additive over micro-batches; `aux` holds the per-layer expert loads laid out like the
expert biases (`Transformer.expert_loads`), which the update tail turns into the bias update.

A pipeline computes a micro-batch's loss in pieces, where their inputs are: a `StagedObjective`
also gives the model's per-token inputs, the terms of the output logits (after the last chunk)
and the terms of a set of MoE layers' statistics (in each chunk, and for the MTP modules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from frontier_jax.model import Transformer
from frontier_jax.model.block import SequenceInputs
from frontier_jax.model.moe import MoEStats


class Objective(Protocol):
    batch_spec: Mapping[str, np.dtype]
    """The keys of the host batch and their dtypes (each [global_batch, seq_len])."""

    def prepare(self, batch: Mapping[str, jax.Array], rows_in_use: jax.Array) -> Any:
        """The global batch as the objective reads it; rows_in_use [B] bool (batch-size ramp):
        rows beyond it must not influence the step."""

    def normalisers(self, batch: Any, micro_batches: int) -> dict:
        """Counts of the whole prepared global batch that every micro-batch divides by."""

    def __call__(self, model: Transformer, batch: Any, normalisers: dict) -> tuple[jax.Array, dict, Any]:
        """(loss, metrics, aux) of one micro-batch."""

    def summarize(self, metrics: dict, normalisers: dict) -> dict:
        """Reported metrics from the micro-batch metrics summed over the step."""


class StagedObjective(Objective, Protocol):
    """An objective whose micro-batch loss is output terms + routing terms, so that
        objective(model, mb, norm).loss
          = output_terms(logits, mtp_logits, mb, norm).loss + sum over disjoint layer sets S of
            routing_terms([stats of S], norm).loss
    and the metrics are the union of both (each additive over layer sets and micro-batches)."""

    def sequence_inputs(self, batch: Any) -> SequenceInputs:
        """The per-token inputs every block reads (positions, document ids, token mask)."""

    def output_terms(
        self, logits: jax.Array, mtp_logits: jax.Array | None, batch: Any, normalisers: dict
    ) -> tuple[jax.Array, dict]:
        """(loss, metrics) of the output logits [B, T, V] and MTP logits [D, B, T, V] or None."""

    def routing_terms(self, stats: Sequence[MoEStats | None], normalisers: dict) -> tuple[jax.Array, dict]:
        """(loss, metrics) of MoE layers' statistics (stacked [L, ...] per entry; None skipped)."""
