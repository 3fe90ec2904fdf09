"""Context stages: a run as consecutive stages of steps, each with its own sequence length,
global batch, RoPE scaling and optionally a constant learning rate (`train.stages`; DeepSeek-V3
trains at 4K, then extends to 32K and 128K with YaRN, report Sec. 4.3).

Stage i trains the steps k (counted from 0) with until_{i-1} <= k < until_i (until_{-1} = 0),
on the run config `Stage.cfg`: the run's config with train.seq_len, train.global_batch and
model.rope_scaling replaced by the stage's.  Without `train.stages` the run is one stage of
train.seq_len x train.global_batch with model.rope_scaling.  At a stage boundary the training
loop builds the next stage's model program (RoPE / YaRN frequencies and softmax scale are
static parts of the model, not parameters) and jitted step, and a data pipeline packing rows
of the new length that continues the previous stage's document stream
(`data.continue_documents`); parameters, expert biases and optimizer state carry over.

A checkpoint after step k belongs to the stage that trained step k - 1 (`checkpoint_stage`):
its data position is in that stage's pipeline and its saved config is that stage's, so a
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
class Stage:
    index: int
    start_step: int  # the first step it trains (counted from 0)
    until_step: int  # the step after its last (the last stage: at least train.steps)
    cfg: Config  # the run config of this stage
    where: str  # the config fields it comes from, for messages: "train.stages[i]" or "train"
    rope_where: str  # the field its RoPE scaling comes from: "<where>.rope_scaling" or "model.rope_scaling"

    def record(self) -> dict:
        """What a checkpoint records of its stage."""
        return {"index": self.index, "start_step": self.start_step, "until_step": self.until_step}


def context_stages(cfg: Config) -> list[Stage]:
    """The stages of `cfg`, each checked against what the model's RoPE can take
    (`check_context`); raises ValueError naming the field and the fix."""
    train = cfg.train
    if not train.stages:
        stages = [Stage(0, 0, train.steps, cfg, "train", "model.rope_scaling")]
    else:
        stages, start = [], 0
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
            stages.append(Stage(i, start, spec.until_step, stage_cfg, f"train.stages[{i}]", rope_where))
            start = spec.until_step
    for stage in stages:
        check_context(stage)
    return stages


def check_context(stage: Stage) -> None:
    """The stage's rows fit the model's context: seq_len <= model.max_position_embeddings and,
    under YaRN, <= factor x original_max_position_embeddings (the context it is scaled for)."""
    seq_len, model = stage.cfg.train.seq_len, stage.cfg.model
    if seq_len > model.max_position_embeddings:
        raise ValueError(
            f"{stage.where}.seq_len={seq_len} exceeds the model's context, model.max_position_embeddings="
            f"{model.max_position_embeddings}: lower the seq_len or raise model.max_position_embeddings"
        )
    rope = model.rope_scaling
    scaled_for = rope.context()
    if scaled_for is not None and seq_len > scaled_for:
        need = math.ceil(seq_len / rope.original_max_position_embeddings * 100) / 100
        raise ValueError(
            f"{stage.where}.seq_len={seq_len} exceeds the context its YaRN scaling is made for, "
            f"{stage.rope_where}.factor={rope.factor} x original_max_position_embeddings="
            f"{rope.original_max_position_embeddings} = {scaled_for}: raise {stage.rope_where}.factor "
            f"to >= {need} or lower the seq_len"
        )


def check_stages_fit(stages: Sequence[Stage], mesh: Mesh, rules: Mapping[str, Sequence[str]]) -> None:
    """Every stage's batch and sequence split over the mesh (before anything is compiled), and
    with a pipeline, its micro-batches too."""
    for stage in stages:
        check_batch_fits(stage.cfg.train.global_batch, mesh, rules, field=f"{stage.where}.global_batch")
        check_seq_fits(stage.cfg.train.seq_len, mesh, rules, field=f"{stage.where}.seq_len")
        if stage.cfg.train.pipeline.schedule is not None:
            check_micro_batch_fits(
                stage.cfg.train.global_batch,
                stage.cfg.train.micro_batches,
                dict(mesh.shape),
                rules,
                field=f"{stage.where}.global_batch",
            )


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
    """The stage that trains step `step` (counted from 0); the last one past its until_step."""
    return next((s for s in stages if step < s.until_step), stages[-1])


def checkpoint_stage(stages: Sequence[Stage], step: int) -> Stage:
    """The stage of a checkpoint after `step` steps: the one that trained step `step` - 1."""
    return stage_at(stages, step - 1) if step else stages[0]
