"""Gradient strategies: how a step's loss and gradients are computed from the global batch.

A strategy is called as
    strategy(params, biases, batch, objective, normalisers) -> (loss, metrics, aux, grads)
with loss, metrics and aux (expert loads) summed over the pieces it splits the batch into and
grads the gradient of that summed loss w.r.t. params.  `MicroBatchScan` is gradient
accumulation; a pipeline executor over the `stage` axis is another strategy of this shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from frontier_jax.model import Transformer
from frontier_jax.train.objectives import Objective


class GradientStrategy(Protocol):
    micro_batches: int  # pieces the global batch is split into (what the normalisers count)

    def __call__(
        self, params: dict, biases: dict, batch: Any, objective: Objective, normalisers: dict
    ) -> tuple[jax.Array, dict, Any, dict]: ...


class MicroBatchScan:
    """Gradient accumulation: the batch's leading axis B is split into M micro-batches of B / M
    rows, scanned with `lax.scan`; losses, metrics, loads and gradients summed:
        grads = sum_m d loss_m / d params."""

    def __init__(self, model: Callable[[dict, dict], Transformer], micro_batches: int):
        """model: (params, biases) -> Transformer (e.g. `ModelProgram.model`)."""
        self.model, self.micro_batches = model, micro_batches

    def __call__(self, params, biases, batch, objective, normalisers):
        m = self.micro_batches

        def micro_loss(p, mb):
            loss, metrics, aux = objective(self.model(p, biases), mb, normalisers)
            return loss, (metrics, aux)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        micro = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)

        def accumulate(carry, mb):
            (loss, (metrics, aux)), grads = grad_fn(params, mb)
            return jax.tree.map(jnp.add, carry, (loss, metrics, aux, grads)), None

        (loss_shape, (metrics_shape, aux_shape)), grads_shape = jax.eval_shape(
            grad_fn, params, jax.tree.map(lambda x: x[0], micro)
        )
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, metrics_shape, aux_shape, grads_shape)
        )
        (loss, metrics, aux, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        return loss, metrics, aux, grads
