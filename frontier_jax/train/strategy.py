"""Gradient strategies: how a step's loss and gradients are computed from the global batch.

A strategy is called as
    strategy(params, biases, batch, objective, normalisers) -> (loss, metrics, aux, grads)
with loss, metrics and aux (expert loads) summed over the pieces it splits the batch into and
grads the gradient of that summed loss w.r.t. params.  `MicroBatchScan` is gradient
accumulation; `PipelineStages` streams the same micro-batches through pipeline stages over the
mesh's `stage` axis; `gradient_strategy` picks one from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from frontier_jax.model import HiddenOutput, Transformer
from frontier_jax.parallel.pipeline.executor import (
    pipeline_value_and_grad,
    stack_for_stages,
    unstack_from_stages,
)
from frontier_jax.parallel.pipeline.plan import PipelinePlan, pipeline_plan
from frontier_jax.parallel.rules import logical_to_spec
from frontier_jax.runtime.program import ModelProgram
from frontier_jax.train.config import TrainConfig
from frontier_jax.train.objectives import Objective, StagedObjective

STACK = "moe_layers"  # the Transformer's stack that pipeline chunks split (`parallel/pipeline/plan.py`)


class GradientStrategy(Protocol):
    micro_batches: int  # pieces the global batch is split into (what the normalisers count)

    def __call__(
        self, params: dict, biases: dict, batch: Any, objective: Objective, normalisers: dict
    ) -> tuple[jax.Array, dict, Any, dict]: ...


def split_micro_batches(batch: Any, m: int) -> Any:
    """Leaves [B, ...] -> [M, B / M, ...]: micro-batch i holds rows i B/M .. (i+1) B/M - 1."""
    return jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)


class MicroBatchScan:
    """Gradient accumulation: the batch's leading axis B is split into M micro-batches of B / M
    rows, scanned with `lax.scan`; losses, metrics, loads and gradients summed:
        grads = sum_m d loss_m / d params."""

    def __init__(self, model: Callable[[dict, dict], Transformer], micro_batches: int):
        """model: (params, biases) -> Transformer (e.g. `ModelProgram.model`)."""
        self.model, self.micro_batches = model, micro_batches

    def __call__(self, params, biases, batch, objective, normalisers):
        def micro_loss(p, mb):
            loss, metrics, aux = objective(self.model(p, biases), mb, normalisers)
            return loss, (metrics, aux)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        micro = split_micro_batches(batch, self.micro_batches)

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


class PipelineStages:
    """The M micro-batches of `MicroBatchScan`, streamed through the stages of `plan` by the
    SPMD executor (`parallel.pipeline.executor`): the MoE stack [L, ...] is cut into C chunks of
    L / C layers; the embedding and dense prefix run in front of chunk 0, final norm, MTP, head and
    loss after chunk C-1 (`Transformer.front` / `back`).  Per micro-batch m

        loss_m = output_terms(back(x_C), head) + routing_terms(MTP stats) + sum_c routing_terms(chunk c's stats)

    which is the objective's loss of the unpipelined model (`StagedObjective`); the MoE statistics
    of every layer come back from the chunks (loads for the bias update, balance, drops), and
    grads = sum_m d loss_m / d params, as `MicroBatchScan` gives them.

    The micro-batches [M, B / M, ...] are laid out with each one's rows over the batch axes
    before the executor runs: split from the data-sharded [B, ...], micro-batch m would lie on
    a few data shards only, and picking it inside the executor's stage-dependent branches would
    reshard it there, in a collective that waits for the devices of every stage while the
    other stages run other branches (a hang).  The rows of a micro-batch must split evenly over
    the batch axes (`plan.check_micro_batch_fits`)."""

    def __init__(self, program: ModelProgram, plan: PipelinePlan):
        mesh = program.mesh
        if mesh is None or mesh.shape.get("stage", 1) != plan.stages:
            found = None if mesh is None else dict(mesh.shape)
            raise ValueError(
                f"pipeline schedule {plan.schedule.name} on {plan.stages} stages needs a mesh with "
                f"stage={plan.stages}; got {found} (build the trainer on the config's mesh)"
            )
        self.program, self.plan, self.micro_batches = program, plan, plan.micro_batches
        self.table = plan.table
        abstract = nnx.merge(program.graphdef, program.abstract_params, program.abstract_biases)
        self._stack_def = nnx.graphdef(getattr(abstract, STACK))
        self._stack_shapes = (
            nnx.to_pure_dict(program.abstract_params)[STACK],
            nnx.to_pure_dict(program.abstract_biases)[STACK],
        )

    def _model(self, ends) -> Transformer:
        """The Transformer holding the `ends` parameters and biases; its MoE stack holds only
        shapes (the chunks run it)."""
        params, biases = ends
        return self.program.model(
            {**params, STACK: self._stack_shapes[0]}, {**biases, STACK: self._stack_shapes[1]}
        )

    def __call__(self, params, biases, batch, objective: StagedObjective, normalisers):
        for method in ("sequence_inputs", "output_terms", "routing_terms"):
            if not hasattr(objective, method):
                raise TypeError(
                    f"{type(objective).__name__} cannot be cut into pipeline stages: it has no "
                    f"{method} (see train.objectives.StagedObjective)"
                )
        m, plan = self.micro_batches, self.plan
        # each micro-batch's rows over the batch axes, resharded here, where every stage runs it
        rows_sharded = NamedSharding(self.program.mesh, logical_to_spec((None, "batch"), self.program.rules))
        per_micro_batch = {
            "batch": jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(x, rows_sharded), split_micro_batches(batch, m)
            ),
            "norm": jax.tree.map(lambda v: jnp.broadcast_to(v, (m,) + jnp.shape(v)), normalisers),
        }
        ends = tuple({k: v for k, v in tree.items() if k != STACK} for tree in (params, biases))
        chunks = jax.tree.map(
            lambda a: a.reshape((plan.chunks, plan.layers_per_chunk) + a.shape[1:]),
            (params[STACK], biases[STACK]),
        )

        def embed(ends, b):
            mb = b["batch"]
            return self._model(ends).front(mb.input_ids, objective.sequence_inputs(mb))

        def chunk(p, x, b, c):
            inputs = objective.sequence_inputs(b["batch"]).layer_range(
                c * plan.layers_per_chunk, plan.layers_per_chunk
            )
            y, stats = nnx.merge(self._stack_def, *p)(x, inputs)
            return y, objective.routing_terms([stats], b["norm"])[0], stats

        def head(ends, y, b):
            mb, norm = b["batch"], b["norm"]
            model = self._model(ends)
            g, mtp_g, mtp_stats = model.back(y, mb.input_ids, objective.sequence_inputs(mb))
            loss, metrics = objective.output_terms(g, mtp_g, model.output_head(), mb, norm)
            return loss + objective.routing_terms([mtp_stats], norm)[0], (metrics, mtp_stats)

        run = pipeline_value_and_grad(self.table, self.program.mesh, embed, chunk, head)
        loss, (metrics, mtp_stats), stats, (d_chunks, d_ends), _ = run(
            stack_for_stages(self.table, chunks), ends, per_micro_batch
        )
        layers = lambda t: jax.tree.map(
            lambda a: a.reshape((-1,) + a.shape[2:]), unstack_from_stages(self.table, t)
        )  # noqa: E731
        moe_stats = layers(stats)  # [L, ...] summed over micro-batches
        _, routing = objective.routing_terms(
            [moe_stats, mtp_stats], normalisers
        )  # additive: sums in, sums out
        grads = {**d_ends[0], STACK: layers(d_chunks)[0]}  # expert biases get no gradient
        loads = self.program.model(params, biases).expert_loads(
            HiddenOutput(None, None, moe_stats, mtp_stats)
        )
        return loss, metrics | routing, loads, grads


def gradient_strategy(train: TrainConfig, program: ModelProgram) -> GradientStrategy:
    """`PipelineStages` where `train.pipeline.schedule` is set, else `MicroBatchScan` over
    `train.micro_batches`."""
    plan = pipeline_plan(train, program.cfg.mesh, program.cfg.model)
    if plan is None:
        return MicroBatchScan(program.model, train.micro_batches)
    return PipelineStages(program, plan)
