"""Training objectives: what a step minimises, given the model and a batch.

An objective is called once per micro-batch,
    objective(model, batch, normalisers) -> (loss, metrics, aux)
with `batch` a pytree of [B_micro, ...] arrays, `normalisers` computed once from the WHOLE global
batch (so that summing the micro-batch losses equals the loss of one large batch), `metrics` and
`aux` additive over micro-batches; `aux` holds the per-layer expert loads laid out like the
expert biases (`Transformer.expert_loads`), which the update tail turns into the bias update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np

from frontier_jax.model import Transformer


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
