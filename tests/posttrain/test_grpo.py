"""`frontier-jax grpo` (posttrain/grpo.py, posttrain/grpo_cli.py) on the tiny model.

- A short GRPO run on a trivially learnable reward, the share of completion tokens in a fixed set
  of 16 ids (16 / 272 of the vocabulary: about 6% under the fresh model's near-uniform policy),
  with the KL reference kept and two optimiser steps per rollout batch: the mean reward of the last
  5 steps is at least twice that of the first 5; the run resumed from its checkpoint of step 25 (in
  the middle of a rollout batch) logs the same steps 26.. as the uninterrupted run; metrics hold the
  rollout figures, the gap, held-out evaluation, and grpo.png is written.
- The sampler's log-probabilities (the engine's decode path) equal the trainer's forward within
  GAP_BOUND in fp32, routed at T = 1 and, in a short run, with routing replay at T = 0.7 and
  truncated importance sampling (ratio 1 on each batch's first step; the replayed rows misaligned
  with the tokens would put the wrong experts under them and blow the bound).
- A pending batch (mid-batch checkpoint) with the replayed experts restores through JSON, dtypes kept.
- Bad input: G < 2, a prompt longer than the context, an empty prompt set, a reward returning the
  wrong length, a batch whose every group is filtered (counted skips, then exit 4).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from frontier_jax.cli import EXIT_DATA, EXIT_USAGE, main
from frontier_jax.posttrain.rewards import register_reward
from tests.train.common import read_metrics, tiny_overrides

TARGET = frozenset(range(97, 113))  # the byte ids of 'a'..'p'
GAP_BOUND = (
    1e-5  # fp32: |log p_sampler - log p_trainer| per token (absorbed vs expanded MLA); measured <= 1e-6
)


@register_reward("test_token_share")
def _token_share(prompts, completions, completion_ids=None, **columns):
    return [sum(t in TARGET for t in ids) / max(len(ids), 1) for ids in completion_ids]


@register_reward("test_constant")
def _constant(prompts, completions, **columns):
    return [1.0] * len(completions)


@register_reward("test_short")
def _short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def _overrides(*extra: str) -> list[str]:
    return tiny_overrides(
        "train.seq_len=32",
        "train.global_batch=16",
        "train.schedule=constant",
        "train.warmup_steps=0",
        "train.lr=1e-2",
        "train.weight_decay=0.0",
        "train.bias_update_speed=0.0",
        "train.z_loss=0.0",
        "train.steps=30",
        "checkpoint.every=25",  # step 25: mid-batch (num_iterations 2)
        "checkpoint.keep=10",
        "checkpoint.async_save=false",
        "eval.every=15",
        "grpo.group_size=4",
        "grpo.max_completion_tokens=8",
        "grpo.loss_agg=dapo",
        "grpo.eps_high=0.28",
        "grpo.beta=0.01",
        "grpo.num_iterations=2",
        "grpo.rewards=[{name: test_token_share}]",
        "grpo.held_out_count=4",
        *extra,
    )


def _run(run_dir, *extra) -> int:
    return main(["grpo", "--config", "model/toy", "--run-dir", str(run_dir), *_overrides(*extra)])


def test_grpo_raises_a_learnable_reward_and_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    assert _run(run) == 0
    records = {r["step"]: r for r in read_metrics(run)}
    reward = [records[s]["grpo/reward_mean"] for s in range(1, 31)]
    first, last = np.mean(reward[:5]), np.mean(reward[-5:])
    print(f"mean reward: first 5 steps {first:.4f}, last 5 steps {last:.4f}")
    assert last >= 2 * first, reward
    r = records[30]
    for key in ("kl", "entropy", "clip_low", "clip_high", "tokens", "grpo/gap_mean", "grpo/gap_max",
                "grpo/zero_spread_groups", "grpo/completion_len_mean", "grpo/rollout_tokens_per_s",
                "grpo/reward/test_token_share_mean", "tokens_per_s", "eval/reward"):  # fmt: skip
        assert key in r, key
    assert "eval/accuracy" in records[15] and (run / "grpo.png").stat().st_size > 0
    assert max(r["grpo/gap_max"] for r in records.values()) < GAP_BOUND  # the sampler and the trainer agree
    # the first step on each rollout batch: logp_old is the policy's own forward, the ratio 1
    assert all(abs(records[s]["ratio"] - 1) < 1e-5 for s in range(1, 31, 2)), [
        records[s]["ratio"] for s in range(1, 31)
    ]

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "30")
    assert _run(resumed) == 0
    again = {r["step"]: r for r in read_metrics(resumed)}
    for step in range(26, 31):
        for key in ("loss", "grpo/reward_mean", "kl", "grad_norm"):
            assert again[step][key] == records[step][key], (step, key)


@pytest.mark.slow  # 30 s of CI; replay itself: tests/train/test_grpo_objective.py, tests/infer/test_routing_record.py
def test_routing_replay_at_a_temperature_runs_with_ratio_one_and_the_gap_measured(tmp_path):
    """grpo.routing_replay=true with T = 0.7 and truncated importance sampling: the rows carry the
    sampler's experts, logp_old and the first step's forward replay them (ratio 1 on each batch's
    first step), and the gap of the tempered log-probabilities stays within the fp32 bound."""
    run = tmp_path / "run"
    replay = ("grpo.routing_replay=true", "grpo.temperature=0.7", "grpo.tis_cap=2.0")
    assert _run(run, "train.steps=4", "checkpoint.every=0", "eval.every=0", *replay) == 0
    records = {r["step"]: r for r in read_metrics(run)}
    assert sorted(records) == [1, 2, 3, 4]
    assert all(abs(records[s]["ratio"] - 1) < 1e-6 for s in (1, 3)), [r["ratio"] for r in records.values()]
    assert all(np.isfinite(r["loss"]) and r["grpo/gap_max"] < GAP_BOUND for r in records.values())


@pytest.mark.parametrize(
    "extra, message",
    [
        (("grpo.group_size=1",), "grpo.group_size=1 must be >= 2"),
        (("train.seq_len=24",), r"grpo.prompts record 0 .*prompt is 2\d tokens, more than"),
        (("grpo.loss_agg=dr_grpo",), "dr_grpo with grpo.scale_rewards=group"),
        (("train.global_batch=10",), "not a multiple of grpo.group_size=4"),
        (("grpo.tis_cap=2", "grpo.top_p=0.9"), "grpo.tis_cap with grpo.top_p=0.9, grpo.top_k=0: the sampler"),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_2(tmp_path, capsys, extra, message):
    assert _run(tmp_path / "run", *extra) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bar)
    assert err.startswith("error: ") and re.search(message, err), err


def test_an_empty_prompt_set_is_an_error(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("")
    assert _run(tmp_path / "run", f"grpo.prompts={prompts}") == EXIT_USAGE
    assert f"grpo.prompts={prompts}: no prompts" in capsys.readouterr().err


def test_a_reward_of_the_wrong_length_is_an_error_naming_it():
    from frontier_jax.posttrain.rewards import RewardsConfig, RewardSet

    with RewardSet(RewardsConfig.parse_names("test_short"), strict_lengths=True) as rewards:
        with pytest.raises(ValueError, match="reward test_short returned 2 values for 3 completions"):
            rewards.score(["p"] * 3, ["a", "b", "c"])


def test_batches_with_every_group_filtered_are_skipped_counted_then_the_run_stops(monkeypatch, caplog):
    """Dynamic sampling over rounds whose groups all have equal rewards: each batch is refilled
    max_refills times, then skipped and counted; more than train.max_skipped_steps in a row: DataError
    (exit 4).  (The rounds are made here: what is tested is the filter, not the engine.)"""
    from frontier_jax.config import load_config
    from frontier_jax.data import DataError, byte_tokenizer
    from frontier_jax.posttrain import grpo as rollouts_module
    from frontier_jax.posttrain.rewards import RewardsConfig, RewardSet

    cfg = load_config(
        "model/toy",
        _overrides("grpo.dynamic_sampling=true", "grpo.max_refills=1", "train.max_skipped_steps=2"),
    )
    source = rollouts_module.Rollouts(
        cfg.grpo,
        cfg.train,
        cfg.infer,
        RewardSet(RewardsConfig.parse_names("test_constant")),
        byte_tokenizer(),
        None,
    )
    rounds = []

    def equal_rewards(self, state, count):
        rounds.append(count)
        n = count * cfg.grpo.group_size
        return rollouts_module.Sampled(
            [{}] * count, [[1]] * count, [], np.ones(n), {}, np.ones(n), np.zeros(n, bool), 0.0
        )

    monkeypatch.setattr(rollouts_module.Rollouts, "_sample", equal_rewards)
    with pytest.raises(DataError, match="3 rollout batches in a row had no group with unequal rewards"):
        source.next(None)
    assert rounds == [4] * 6  # 3 batches x (1 round + 1 refill) of 4 prompts
    assert source.skipped == 3 and sum("batch skipped" in r.getMessage() for r in caplog.records) == 3
    from frontier_jax.cli import _exit_code

    assert _exit_code(DataError("x")) == EXIT_DATA


def test_a_pending_batch_with_routed_experts_is_restored_from_the_checkpoint_state():
    """Mid-batch (num_iterations 2, one step taken) with routing replay: the source's checkpoint
    state, through JSON, gives a source whose next batch is the pending one, every key equal in
    value and dtype (the replayed experts int32 [B, T, L_moe, k]), without sampling anew."""
    from frontier_jax.config import load_config
    from frontier_jax.data import byte_tokenizer
    from frontier_jax.posttrain.grpo import Rollouts
    from frontier_jax.posttrain.rewards import RewardsConfig, RewardSet

    cfg = load_config("model/toy", _overrides("grpo.routing_replay=true"))

    def source():
        rewards = RewardSet(RewardsConfig.parse_names("test_constant"))
        return Rollouts(cfg.grpo, cfg.train, cfg.infer, rewards, byte_tokenizer(), None)

    rng = np.random.default_rng(0)
    rows, seq, m = cfg.train.global_batch, cfg.train.seq_len, cfg.model
    pending = {key: rng.normal(size=(rows, seq)).astype(dtype) for key, dtype in source().spec.items()}
    pending["routed_experts"] = rng.integers(
        0, m.n_routed_experts, (rows, seq, m.num_moe_layers, m.num_experts_per_tok)
    ).astype(np.int32)
    before = source()
    before.pending, before.iteration, before.figures = pending, 1, {"grpo/reward_mean": 0.5}
    after = source()
    after.set_state(json.loads(json.dumps(before.get_state())))
    batch = after.next(None)  # no state: a new rollout would need the engine and fail
    assert set(batch) == set(pending) and after.iteration == 2
    for key, value in pending.items():
        assert batch[key].dtype == value.dtype and np.array_equal(batch[key], value), key
    assert after.figures == before.figures


def test_config_file_loads():
    from frontier_jax.config import load_config

    cfg = load_config("posttrain/grpo-toy")
    assert cfg.train.global_batch % cfg.grpo.group_size == 0 and cfg.train.bias_update_speed == 0
    assert json.dumps(cfg.grpo.rewards)
