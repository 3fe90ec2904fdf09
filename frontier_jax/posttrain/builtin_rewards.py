"""The registered reward functions: `math`, `format`, `exact`, `code` and `model`."""

from __future__ import annotations

import re

from frontier_jax.posttrain.answers import FORMAT, final_answer, normalise
from frontier_jax.posttrain.rewards import RewardsConfig, RewardSpec, register_reward


def format_reward(prompts, completions, **columns) -> list[float | None]:
    """1 when the completion is `[<think>...</think>] text <answer>...</answer>`, else 0."""
    return [float(FORMAT.fullmatch(c) is not None) for c in completions]


def exact_reward(prompts, completions, answer=None, **columns) -> list[float | None]:
    """1 when normalise(final_answer(completion)) == normalise(answer), else 0; None without gold."""
    if answer is None:
        raise ValueError("exact reward: the records have no `answer` column")
    return [
        None if gold is None else float(normalise(final_answer(c)) == normalise(gold))
        for c, gold in zip(completions, answer)
    ]


def _format(spec: RewardSpec, config: RewardsConfig):
    if "pattern" not in spec.options:
        return format_reward
    pattern = re.compile(spec.options["pattern"], re.DOTALL)
    return lambda prompts, completions, **columns: [
        float(pattern.fullmatch(c) is not None) for c in completions
    ]


def _math(spec: RewardSpec, config: RewardsConfig):
    from frontier_jax.posttrain.math_reward import MathReward

    return MathReward(timeout_s=spec.options.get("timeout_s", 5), workers=config.workers)


def _code(spec: RewardSpec, config: RewardsConfig):
    from frontier_jax.posttrain.code_reward import CodeReward, limits_from_options
    from frontier_jax.posttrain.sandbox import Sandbox

    sandbox = Sandbox(limits_from_options(spec.options), unconfined=config.unconfined_sandbox)
    return CodeReward(sandbox, workers=config.workers)


register_reward("format", builder=_format)
register_reward("exact", exact_reward)
register_reward("math", builder=_math)
register_reward("code", builder=_code)


def _model(spec: RewardSpec, config: RewardsConfig):
    from frontier_jax.posttrain.reward_model import ModelReward

    options = dict(spec.options)
    if "checkpoint" not in options:
        raise ValueError(
            "rewards model: no `checkpoint` (a reward model's run directory): {name: model, checkpoint: RUN}"
        )
    unknown = set(options) - {"checkpoint", "step", "mesh", "batch_rows"}
    if unknown:
        raise ValueError(
            f"rewards model: unknown option(s) {sorted(unknown)}; known: checkpoint, step, mesh, batch_rows"
        )
    return ModelReward(str(options.pop("checkpoint")), **options)


register_reward("model", builder=_model)
