"""The `grpo:` section of the run configuration (`frontier-jax grpo`).

One section, two halves: the loss fields are `train.objectives.grpo.GRPOLossConfig` (the trainer
reads them, and `train/` may not import `posttrain/`), which `GRPOConfig` extends with what the
rollouts need (prompts, sampling, rewards, advantages, filters).  Train-wide settings stay in
`train:` (lr, steps, seq_len: prompt + completion, global_batch: rows = prompts per step x G,
max_skipped_steps, bias_update_speed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from frontier_jax.posttrain.advantages import ScaleRewards
from frontier_jax.posttrain.rewards import RewardsConfig
from frontier_jax.train.objectives.grpo import GRPOLossConfig, LossAgg

CHAT_ARITHMETIC = "chat_arithmetic"  # the embedded arithmetic problems (`data.chat_math`)


@dataclasses.dataclass
class GRPOConfig(GRPOLossConfig):
    """The loss fields (`GRPOLossConfig`) and:

    prompts: a JSONL of {"prompt", gold columns (answer, tests, ...)} or `chat_arithmetic` (the
      embedded one-operation training problems); held-out questions are dropped either way.
    top_p / top_k: sampling filters (1 / 0: off); num_iterations: optimiser steps per rollout
      batch (logp_old kept); scale_rewards: group | batch | none (`advantages.py`);
    dynamic_sampling: drop groups whose rewards are all equal and refill the batch with new
      prompts, up to max_refills more rounds (rows left over are padding); a batch left with no
      group is skipped and counted (more than train.max_skipped_steps in a row stop the run);
    mask_truncated: completions cut at max_completion_tokens do not train;
    overlong_buffer / overlong_penalty: the soft over-length penalty (buffer 0: off);
    rewards: the reward functions, `[{name: math, weight: 1.0}, {name: format, weight: 0.2}]`
      (`posttrain.rewards`); accuracy is the share of samples the FIRST one scores >= 1;
    held_out / held_out_count: prompts of the held-out evaluation run every eval.every steps
      (greedy; `chat_arithmetic`: the held-out problems, or a JSONL; "" none).
    """

    prompts: str = CHAT_ARITHMETIC
    top_p: float = 1.0
    top_k: int = 0
    num_iterations: int = 1
    scale_rewards: ScaleRewards = ScaleRewards.group
    dynamic_sampling: bool = False
    max_refills: int = 2
    mask_truncated: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    rewards: list[dict[str, Any]] = dataclasses.field(
        default_factory=lambda: [{"name": "math", "weight": 1.0}]
    )
    held_out: str = CHAT_ARITHMETIC
    held_out_count: int = 64

    def validate(self) -> GRPOConfig:
        super().validate()
        if not self.prompts:
            raise ValueError(f"grpo.prompts is empty: give a JSONL of prompts or {CHAT_ARITHMETIC}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"grpo.top_p={self.top_p} must be in (0, 1] and grpo.top_k={self.top_k} >= 0")
        if self.num_iterations < 1 or self.max_refills < 0 or self.held_out_count < 1:
            raise ValueError(
                "grpo.num_iterations and grpo.held_out_count must be >= 1, grpo.max_refills >= 0"
            )
        if self.loss_agg == LossAgg.dr_grpo and self.scale_rewards == ScaleRewards.group:
            raise ValueError(
                "grpo.loss_agg=dr_grpo with grpo.scale_rewards=group: Dr. GRPO removes the std scaling; "
                "set grpo.scale_rewards=none (or batch)"
            )
        if not 0 <= self.overlong_buffer <= self.max_completion_tokens or self.overlong_penalty < 0:
            raise ValueError(
                f"grpo.overlong_buffer={self.overlong_buffer} must be in [0, grpo.max_completion_tokens="
                f"{self.max_completion_tokens}] and grpo.overlong_penalty >= 0"
            )
        if self.tis_cap and (self.top_p != 1 or self.top_k):
            raise ValueError(
                f"grpo.tis_cap with grpo.top_p={self.top_p}, grpo.top_k={self.top_k}: the sampler's "
                "log-probabilities are of the unfiltered softmax(z / T), not of the filtered distribution "
                "the tokens are drawn from; use grpo.top_p=1 and grpo.top_k=0 (or set grpo.tis_cap=0)"
            )
        if not self.rewards:
            raise ValueError("grpo.rewards is empty: list at least one reward function, e.g. [{name: math}]")
        self.rewards_config()
        return self

    def rewards_config(self) -> RewardsConfig:
        """The `posttrain.rewards` configuration of `rewards`."""
        return RewardsConfig.from_dict([dict(entry) for entry in self.rewards])
