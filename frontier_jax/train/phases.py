"""Context phases: a run as consecutive phases of steps, each with its own sequence length,
global batch, RoPE scaling and optionally a constant learning rate (the config's `train.stages`;
DeepSeek-V3 trains at 4K, then extends to 32K and 128K with YaRN in two further phases, report
Sec. 4.3).  "Phase" names them in the code, so that "stage" means only a pipeline stage (the
`stage` mesh axis); the config keys and the "stage" records keep their names.

Phase i trains the steps k (counted from 0) with until_{i-1} <= k < until_i (until_{-1} = 0),
on the run config `ContextPhase.cfg`: the run's config with train.seq_len, train.global_batch
and model.rope_scaling replaced by the phase's.  Without `train.stages` the run is one phase of
train.seq_len x train.global_batch with model.rope_scaling.  At a phase boundary the training
loop builds the next phase's model program (RoPE / YaRN frequencies and softmax scale are
static parts of the model, not parameters) and jitted step, and a data pipeline packing rows
of the new length that continues the previous phase's document stream
(`data.continue_documents`); parameters, expert biases and optimizer state carry over.

A checkpoint after step k belongs to the phase that trained step k - 1 (`checkpoint_phase`):
its data position is in that phase's pipeline and its saved config is that phase's, so a
parameters-only restore (evaluation, inference) builds the model with the RoPE scaling those
parameters were trained with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from jax.sharding import Mesh

from frontier_jax.parallel.mesh import check_batch_fits, check_seq_fits
from frontier_jax.parallel.pipeline.plan import check_micro_batch_fits

if TYPE_CHECKING:  # the composed config sits above train
    from frontier_jax.config import Config


@dataclasses.dataclass(frozen=True)
class ContextPhase:
    index: int
    start_step: int  # the first step it trains (counted from 0)
    until_step: int  # the step after its last (the last stage: at least train.steps)
    cfg: Config  # the run config of this stage
    where: str  # the config fields it comes from, for messages: "train.stages[i]" or "train"
    rope_where: str  # the field its RoPE scaling comes from: "<where>.rope_scaling" or "model.rope_scaling"

    def record(self) -> dict:
        """What a checkpoint records of its stage."""
        return {"index": self.index, "start_step": self.start_step, "until_step": self.until_step}


def context_phases(cfg: Config) -> list[ContextPhase]:
    """The stages of `cfg`, each checked against what the model's RoPE can take
    (`check_context`); raises ValueError naming the field and the fix."""
    train = cfg.train
    if not train.stages:
        phases = [ContextPhase(0, 0, train.steps, cfg, "train", "model.rope_scaling")]
    else:
        phases, start = [], 0
        for i, spec in enumerate(train.stages):
            model, rope_where = cfg.model, "model.rope_scaling"
            if spec.rope_scaling is not None:
                model, rope_where = (
                    dataclasses.replace(model, rope_scaling=spec.rope_scaling),
                    f"train.stages[{i}].rope_scaling",
                )
            stage_cfg = dataclasses.replace(
                cfg,
                train=dataclasses.replace(train, seq_len=spec.seq_len, global_batch=spec.global_batch),
                model=model,
            )
            phases.append(
                ContextPhase(i, start, spec.until_step, stage_cfg, f"train.stages[{i}]", rope_where)
            )
            start = spec.until_step
    for phase in phases:
        check_context(phase)
    return phases


def check_context(phase: ContextPhase) -> None:
    """The stage's rows fit the model's context: seq_len <= model.max_position_embeddings and,
    under YaRN, <= factor x original_max_position_embeddings (the context it is scaled for)."""
    seq_len, model = phase.cfg.train.seq_len, phase.cfg.model
    if seq_len > model.max_position_embeddings:
        raise ValueError(
            f"{phase.where}.seq_len={seq_len} exceeds the model's context, model.max_position_embeddings="
            f"{model.max_position_embeddings}: lower the seq_len or raise model.max_position_embeddings"
        )
    rope = model.rope_scaling
    scaled_for = rope.context()
    if scaled_for is not None and seq_len > scaled_for:
        need = math.ceil(seq_len / rope.original_max_position_embeddings * 100) / 100
        raise ValueError(
            f"{phase.where}.seq_len={seq_len} exceeds the context its YaRN scaling is made for, "
            f"{phase.rope_where}.factor={rope.factor} x original_max_position_embeddings="
            f"{rope.original_max_position_embeddings} = {scaled_for}: raise {phase.rope_where}.factor "
            f"to >= {need} or lower the seq_len"
        )


def check_phases_fit(phases: Sequence[ContextPhase], mesh: Mesh, rules: Mapping[str, Sequence[str]]) -> None:
    """Every stage's batch and sequence split over the mesh (before anything is compiled), and
    with a pipeline, its micro-batches too."""
    for phase in phases:
        check_batch_fits(phase.cfg.train.global_batch, mesh, rules, field=f"{phase.where}.global_batch")
        check_seq_fits(phase.cfg.train.seq_len, mesh, rules, field=f"{phase.where}.seq_len")
        if phase.cfg.train.pipeline.schedule is not None:
            check_micro_batch_fits(
                phase.cfg.train.global_batch,
                phase.cfg.train.micro_batches,
                dict(mesh.shape),
                rules,
                field=f"{phase.where}.global_batch",
            )


def phase_at(phases: Sequence[ContextPhase], step: int) -> ContextPhase:
    """The stage that trains step `step` (counted from 0); the last one past its until_step."""
    return next((s for s in phases if step < s.until_step), phases[-1])


def checkpoint_phase(phases: Sequence[ContextPhase], step: int) -> ContextPhase:
    """The stage of a checkpoint after `step` steps: the one that trained step `step` - 1."""
    return phase_at(phases, step - 1) if step else phases[0]
