"""Training objectives: what a step minimises, given the model and a batch.

An objective is called once per micro-batch,
    objective(model, batch, normalisers) -> (loss, metrics, aux)
with `batch` a pytree of [B_micro, ...] arrays (its `prepare` of the global batch, split),
`normalisers` computed once from the WHOLE prepared global batch (so that summing the micro-batch
losses equals the loss of one large batch), `metrics` and `aux` additive over micro-batches;
`aux` holds the per-layer expert loads laid out like the expert biases
(`Transformer.expert_loads`), which the update tail turns into the bias update.

The objective owns what it reads of the batch: its keys (`batch_spec`), which rows are in use
(the batch-size ramp pads the global batch with rows that must not count) and what it reports
(`summarize`; a `tokens` figure gives the loop its tokens per second).  An objective with state of
its own (e.g. a reference model's parameters) keeps it in `TrainState.extra`: `init_extra` makes
it from the initial parameters, `extra_shardings` lays it out, `prepare` receives it each step and
the optional `next_extra(extra, params, step)` gives it after each update (step: the updates
done), all checkpointed with the train state.  Objectives without state leave both methods out
(`extra = {}`).

A pipeline computes a micro-batch's loss in pieces, where their inputs are: a `StagedObjective`
also gives the model's per-token inputs, the terms of the model's output (after the last chunk:
the final-normed hidden state and the model's `OutputHead`, so that the objective reads logits,
vocabulary-chunked log-probabilities or values itself) and the terms of a set of MoE layers'
statistics (in each chunk, and for the MTP modules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from frontier_jax.model import Transformer
from frontier_jax.model.block import SequenceInputs
from frontier_jax.model.head import OutputHead
from frontier_jax.model.moe import MoEStats


class Objective(Protocol):
    batch_spec: Mapping[str, np.dtype]
    """The keys of the host batch and their dtypes (each [global_batch, ...])."""

    def prepare(self, batch: Mapping[str, jax.Array], extra: Any) -> Any:
        """The global batch as the objective reads it, rows switched off by the batch-size ramp
        (padding rows) made inert: they must not influence the step.  extra: `TrainState.extra`."""

    def normalisers(self, batch: Any, micro_batches: int) -> dict:
        """Counts of the whole prepared global batch that every micro-batch divides by."""

    def __call__(self, model: Transformer, batch: Any, normalisers: dict) -> tuple[jax.Array, dict, Any]:
        """(loss, metrics, aux) of one micro-batch."""

    def summarize(self, metrics: dict, normalisers: dict) -> dict:
        """Reported metrics from the micro-batch metrics summed over the step."""


def initial_extra(objective: Objective, params: dict, biases: dict) -> Any:
    """The objective's state at the start of a run: `objective.init_extra(params, biases)`, or {}."""
    init = getattr(objective, "init_extra", None)
    return {} if init is None else init(params, biases)


def extra_shardings(objective: Objective, param_shardings: dict, bias_shardings: dict) -> Any:
    """Shardings of `initial_extra` (a pytree of NamedShardings matching it): the objective's
    `extra_shardings(param_shardings, bias_shardings)`, or {}."""
    layout = getattr(objective, "extra_shardings", None)
    return {} if layout is None else layout(param_shardings, bias_shardings)


class StagedObjective(Objective, Protocol):
    """An objective whose micro-batch loss is output terms + routing terms, so that
        objective(model, mb, norm).loss
          = output_terms(g, g_mtp, head, mb, norm).loss + sum over disjoint layer sets S of
            routing_terms([stats of S], norm).loss
    and the metrics are the union of both (each additive over layer sets and micro-batches)."""

    def sequence_inputs(self, batch: Any) -> SequenceInputs:
        """The per-token inputs every block reads (positions, document ids, token mask)."""

    def output_terms(
        self, hidden: jax.Array, mtp_hidden: jax.Array | None, head: OutputHead, batch: Any, normalisers: dict
    ) -> tuple[jax.Array, dict]:
        """(loss, metrics) of the final-normed hidden state g [B, T, d] and the MTP depths' g^k
        [D, B, T, d] or None, read through the model's output `head`."""

    def routing_terms(self, stats: Sequence[MoEStats | None], normalisers: dict) -> tuple[jax.Array, dict]:
        """(loss, metrics) of MoE layers' statistics (stacked [L, ...] per entry; None skipped)."""
