"""The training sections of the run configuration: optimisation (`train:`, with its context
stages `train.stages`) and checkpoints (`checkpoint:`).  Closed choices are Enums: OmegaConf
rejects other values on load."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from frontier_jax.model.config import RopeScalingConfig
from frontier_jax.parallel.pipeline.plan import PipelineConfig


class LRSchedule(enum.StrEnum):
    constant = "constant"
    cosine = "cosine"
    deepseek = "deepseek"


class MomentDtype(enum.StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class NonFinitePolicy(enum.StrEnum):
    stop = "stop"  # raise, keeping the last good checkpoint
    skip = "skip"  # leave the state unchanged and go on


class ObjectiveName(enum.StrEnum):
    """What `frontier-jax train` minimises: `pretrain` (next-token CE + MTP + balance on the
    `data:` pipeline; SFT when it carries chats) or `preference` (a reward model's Bradley-Terry
    loss over `train.preference.data`, `objectives/preference.py`)."""

    pretrain = "pretrain"
    preference = "preference"


@dataclass
class PreferenceConfig:
    """The pairs of `train.objective: preference`: data, a JSONL of {"prompt", "chosen",
    "rejected"} (or chat `messages` ending with the two assistant answers, `data/preferences.py`),
    read in a new shuffled order each epoch; centring, the coefficient c of c (r_c + r_r)^2."""

    data: Optional[str] = None
    centring: float = 0.0


@dataclass
class ContextPhaseConfig:
    """One context stage of `train.stages`: the steps from the previous stage's `until_step` (0
    for the first) up to `until_step` train on rows of `seq_len` tokens, `global_batch` rows per
    step, with the RoPE scaling `rope_scaling` (None: `model.rope_scaling`) and, when `lr` is
    set, a constant learning rate instead of `train.schedule`'s (`train.phases.ContextPhase`)."""

    until_step: int
    seq_len: int
    global_batch: int
    lr: Optional[float] = None
    rope_scaling: Optional[RopeScalingConfig] = None


@dataclass
class TrainConfig:
    """Optimisation.  lr schedule "deepseek" = linear warmup -> constant peak until
    `decay_start` -> cosine to `lr_min` over `decay_steps` -> constant `lr_min` (V3 report
    Sec. 4.2 shape); "cosine" = warmup -> cosine to lr_min at `steps`."""

    steps: int = 300
    seed: int = 0
    # start a new run from another run's parameters: RUN_DIR[/checkpoints/STEP] or hf:PATH (`init_from.py`)
    init_from: Optional[str] = None
    objective: ObjectiveName = ObjectiveName.pretrain
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    seq_len: int = 128
    global_batch: int = 16
    micro_batches: int = 1  # gradient accumulation: global_batch is split into this many
    lr: float = 3e-3
    lr_min: float = 3e-4
    schedule: LRSchedule = LRSchedule.cosine
    warmup_steps: int = 20
    decay_start: int = 0  # "deepseek" schedule: step where cosine decay begins
    decay_steps: int = 0  # "deepseek" schedule: length of the cosine decay
    batch_ramp_steps: int = 0  # batch-size ramp: grow from batch_ramp_start to global_batch
    batch_ramp_start: int = 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    moment_dtype: MomentDtype = MomentDtype.float32
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    bias_update_speed: float = 1e-3  # gamma of auxiliary-loss-free balancing
    z_loss: float = 0.0
    on_nonfinite: NonFinitePolicy = NonFinitePolicy.stop
    max_skipped_steps: int = 5  # on_nonfinite=skip: more non-finite steps in a row stop the run
    log_every: int = 1
    stages: list[ContextPhaseConfig] = field(default_factory=list)  # empty: one stage, seq_len x global_batch
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # stages over mesh.stage

    def validate(self) -> "TrainConfig":
        for name in ("steps", "seq_len", "global_batch", "micro_batches", "log_every", "max_skipped_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be > 0")
        if self.init_from is not None and self.init_from.removeprefix("hf:").strip() == "":
            raise ValueError(
                f"train.init_from={self.init_from!r} names no source: give RUN_DIR, RUN_DIR/checkpoints/STEP "
                "or hf:PATH (or leave it out)"
            )
        if self.global_batch % self.micro_batches:
            raise ValueError(
                f"train.global_batch={self.global_batch} is not divisible by "
                f"train.micro_batches={self.micro_batches}; pick a divisor"
            )
        if self.objective == ObjectiveName.preference:
            if not self.preference.data:
                raise ValueError(
                    "train.objective=preference needs train.preference.data: a JSONL of {prompt, chosen, rejected}"
                )
            if (self.global_batch // self.micro_batches) % 2:
                raise ValueError(
                    f"train.objective=preference: train.global_batch={self.global_batch} / train.micro_batches="
                    f"{self.micro_batches} rows per micro-batch must be even (the two sides of a pair sit together)"
                )
            if self.preference.centring < 0:
                raise ValueError(f"train.preference.centring={self.preference.centring} must be >= 0")
        if self.lr <= 0 or self.lr_min < 0 or self.lr_min > self.lr:
            raise ValueError(
                f"train.lr={self.lr} / train.lr_min={self.lr_min}: need 0 <= lr_min <= lr, lr > 0"
            )
        if self.warmup_steps < 0 or self.decay_start < 0 or self.decay_steps < 0:
            raise ValueError("train.warmup_steps, train.decay_start and train.decay_steps must be >= 0")
        if self.schedule == "deepseek" and not self.decay_steps:
            raise ValueError(
                "train.decay_steps=0 with train.schedule='deepseek' would drop the lr from its peak "
                "to lr_min in one step; set train.decay_steps to the cosine's length (V3: about "
                "a third of training), or use train.schedule=cosine"
            )
        if self.batch_ramp_steps:
            batch, name = (
                (self.stages[0].global_batch, "train.stages[0].global_batch")
                if self.stages
                else (self.global_batch, "train.global_batch")
            )
            if not 0 < self.batch_ramp_start <= batch:
                raise ValueError(
                    f"train.batch_ramp_start={self.batch_ramp_start} must be in "
                    f"(0, {name}={batch}] when batch_ramp_steps > 0"
                )
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        self._validate_stages()
        self.pipeline.validate()
        return self

    def _validate_stages(self) -> None:
        """The stage fields on their own; what the model and the mesh can take is checked
        against them by `train.phases.check_phases_fit`."""
        previous = 0
        for i, stage in enumerate(self.stages):
            where = f"train.stages[{i}]"
            if stage.until_step <= previous:
                raise ValueError(
                    f"{where}.until_step={stage.until_step} must exceed "
                    + (f"train.stages[{i - 1}].until_step={previous}" if i else "0")
                    + ": stages run in order, each until a later step"
                )
            previous = stage.until_step
            if stage.seq_len < 2:
                raise ValueError(f"{where}.seq_len={stage.seq_len} must be >= 2 (a row needs a next token)")
            if stage.global_batch <= 0 or stage.global_batch % self.micro_batches:
                raise ValueError(
                    f"{where}.global_batch={stage.global_batch} must be a positive multiple of "
                    f"train.micro_batches={self.micro_batches}"
                )
            if stage.lr is not None and stage.lr <= 0:
                raise ValueError(f"{where}.lr={stage.lr} must be > 0 (or left out: train.schedule's lr)")
            if stage.rope_scaling is not None:
                stage.rope_scaling.validate(f"{where}.rope_scaling")
        if self.stages and previous < self.steps:
            raise ValueError(
                f"train.steps={self.steps} runs past the last stage (train.stages[{len(self.stages) - 1}]"
                f".until_step={previous}): raise that until_step or lower train.steps"
            )
        if self.stages and self.batch_ramp_steps > self.stages[0].until_step:
            raise ValueError(
                f"train.batch_ramp_steps={self.batch_ramp_steps} must be <= train.stages[0].until_step="
                f"{self.stages[0].until_step}: the batch-size ramp ends within the first stage"
            )


@dataclass
class CheckpointConfig:
    every: int = 100  # save every N steps (0 = only at the end)
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True
    stop_timeout_s: float = 120.0  # after SIGTERM/SIGINT: longest wait to save and exit, then exit anyway

    def validate(self) -> "CheckpointConfig":
        if self.every < 0:
            raise ValueError(f"checkpoint.every={self.every} must be >= 0")
        if not self.stop_timeout_s > 0:
            raise ValueError(f"checkpoint.stop_timeout_s={self.stop_timeout_s} must be > 0")
        if self.keep <= 0:
            raise ValueError(f"checkpoint.keep={self.keep} must be > 0")
        return self
