"""GRPO's rollouts: the batch source of `frontier-jax grpo` (`train.batches.BatchSource`).

One rollout batch, from the current policy (the engine holds the trainer's parameters):

    prompts (P = train.global_batch / G per batch, a new order each epoch from train.seed)
      -> Engine.from_program on the trainer's program: G samples each (SamplingParams.n = G, one
         prefill forked), at temperature T, top-p, top-k, at most max_completion_tokens, stopped
         at the chat's end token; prompt k drawn overall samples with seed (seed 2^24 + k G) mod 2^32
      -> rewards (`RewardSet`, weighted; columns: the prompt rows' fields and `completion_ids`)
         + the soft over-length penalty -> group advantages (`advantages.py`), dynamic sampling
      -> rows [prompt | completion] with the policy's log-probabilities at T (logp_old, one forward
         of the trainer's program before the batch's first update) and the reference's (beta > 0);
         with routing_replay the engine records each token's experts (prompt included), the rows
         carry them (routed_experts [B, T, L_moe, k]) and every forward here and in the objective
         replays them, so logp_old and the first step's logp are one computation (ratio 1)
    then `num_iterations` optimiser steps on it; `after_update` hands every new state to the engine
    (`Engine.load_weights`: no copy to disk, no recompilation).

A row is one sequence: the prompt's tokens, then the completion's (the end token included: the
policy learns to stop), padded; targets are the next tokens and `completion_mask` marks the
targets that are completion tokens of a sample that trains.  The rollout/trainer gap is measured
on every batch: |logp_sampler - logp_old| over completion tokens, both log softmax(z / T)[y] at the
rollout temperature T, logp_sampler from the engine's decode path (absorbed MLA over the paged
cache; `Completion.tempered_logprobs`), logp_old from the training forward.  Both are of the
unfiltered tempered distribution: with top_p < 1 or top_k > 0 the tokens are drawn from it
renormalised over the kept set, which the gap leaves out (it measures the two implementations,
not the filter); truncated importance sampling needs the drawing distribution and refuses them.

State (checkpointed): the epoch and the prompts of it read, the prompts drawn overall, the steps
taken on the current batch, skipped batches, and the current batch itself while steps remain on
it (num_iterations > 1), so a resumed run trains on what the uninterrupted one does.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from frontier_jax.data import DataError
from frontier_jax.data.chat_math import Difficulty, exclude_held_out, held_out_problems, train_problems
from frontier_jax.data.template import ChatTemplate
from frontier_jax.data.tokenizer import END, Tokenizer
from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.infer.config import InferConfig
from frontier_jax.infer.scheduler import Completion
from frontier_jax.parallel.mesh import batch_sharding
from frontier_jax.posttrain.advantages import group_advantages, overlong_penalty, spread_groups, trains
from frontier_jax.posttrain.chat import prompt_ids
from frontier_jax.posttrain.config import CHAT_ARITHMETIC, GRPOConfig
from frontier_jax.posttrain.rewards import RewardSet
from frontier_jax.runtime.logprobs import logprob_step
from frontier_jax.runtime.program import ModelProgram, inference_impl
from frontier_jax.train.batches import BatchSource, EpochOrder
from frontier_jax.train.config import TrainConfig
from frontier_jax.train.loop import device_batch
from frontier_jax.train.objectives.grpo import batch_spec
from frontier_jax.train.state import TrainState

log = logging.getLogger(__name__)
EMBEDDED_PROMPTS = 2000  # training problems of `chat_arithmetic`


def read_prompt_rows(spec: str, what: str) -> list[dict]:
    """The rows {"prompt", gold columns} of `chat_arithmetic` or a JSONL (held-out questions
    dropped); an error naming `what` when none is left."""
    if spec == CHAT_ARITHMETIC:
        rows = [p.row() for p in train_problems(Difficulty(), EMBEDDED_PROMPTS, seed=0)]
    else:
        from frontier_jax.posttrain.cli import read_jsonl

        rows, dropped = exclude_held_out(read_jsonl(spec, ("prompt",)))
        if dropped:
            log.warning("%s=%s: %d held-out questions dropped", what, spec, dropped)
    if not rows:
        raise ValueError(f"{what}={spec}: no prompts to train on")
    return [dict(row) for row in rows]


def encode_prompts(
    rows: Sequence[Mapping], tokenizer: Tokenizer, template: ChatTemplate | None, room: int, what: str
) -> list[list[int]]:
    """The generation prompts of `rows`; a prompt longer than `room` tokens is an error naming it."""
    encoded = []
    for i, row in enumerate(rows):
        ids = prompt_ids(tokenizer, template, row["prompt"])
        if len(ids) > room:
            raise ValueError(
                f"{what} record {i} ({row['prompt'][:40]!r}...): its prompt is {len(ids)} tokens, more than "
                f"train.seq_len - grpo.max_completion_tokens = {room}: raise train.seq_len or shorten it"
            )
        encoded.append(ids)
    return encoded


def check_shapes(train: TrainConfig, grpo: GRPOConfig) -> None:
    """The rows of a step hold whole groups, and a completion fits a row."""
    if train.global_batch % grpo.group_size:
        raise ValueError(
            f"train.global_batch={train.global_batch} is not a multiple of grpo.group_size={grpo.group_size}: "
            "a step trains on whole groups (global_batch = prompts per step x G)"
        )
    if grpo.max_completion_tokens >= train.seq_len:
        raise ValueError(
            f"grpo.max_completion_tokens={grpo.max_completion_tokens} leaves no room for a prompt in "
            f"train.seq_len={train.seq_len}"
        )


def rollout_infer(infer: InferConfig, train: TrainConfig) -> InferConfig:
    """The rollout engine's `infer:` section: rows of train.seq_len tokens (prompt + completion),
    every row of a step decoded at once (max_seqs at least train.global_batch)."""
    return dataclasses.replace(infer, max_len=train.seq_len, max_seqs=max(infer.max_seqs, train.global_batch))


@dataclasses.dataclass
class Sampled:
    """One round of generation: prompt rows, completions (G per prompt), rewards."""

    rows: list[dict]
    prompts: list[list[int]]
    completions: list[Completion]
    reward: np.ndarray  # [N] float64, NaN = None
    by_function: dict[str, list[float | None]]
    lengths: np.ndarray  # [N] completion tokens
    truncated: np.ndarray  # [N] bool
    seconds: float


def _pack(arrays: dict[str, np.ndarray]) -> str:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _unpack(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text))) as data:
        return {k: data[k] for k in data.files}


class Rollouts(BatchSource):
    """The batch source of the module docstring."""

    def __init__(
        self, grpo: GRPOConfig, train: TrainConfig, infer, rewards: RewardSet, tokenizer: Tokenizer,
        template: ChatTemplate | None,
    ):  # fmt: skip
        check_shapes(train, grpo)
        self.grpo, self.train, self.infer, self.rewards = grpo, train, infer, rewards
        self.tokenizer, self.template = tokenizer, template
        self.rows = read_prompt_rows(grpo.prompts, "grpo.prompts")
        room = train.seq_len - grpo.max_completion_tokens
        self.prompt_ids = encode_prompts(self.rows, tokenizer, template, room, "grpo.prompts")
        self.spec = batch_spec(grpo)
        self.per_step = train.global_batch // grpo.group_size
        end = tokenizer.special_ids.get(END)
        self.stop = (end,) if end is not None else ()
        self.program: ModelProgram | None = None
        self.engine: Engine | None = None
        self.order = EpochOrder(len(self.rows), train.seed)
        self.drawn = self.iteration = self.skipped = 0
        self.pending: dict[str, np.ndarray] | None = None
        self.figures: dict[str, float] = {}

    # ------------------------------------------------------------------ BatchSource
    def use_program(self, program: ModelProgram) -> None:
        self.program = program
        self.sharding = batch_sharding(program.mesh, program.rules)
        self.logprobs = logprob_step(program, temperature=self.grpo.temperature)

    def next(self, state: TrainState) -> Mapping[str, np.ndarray]:
        if self.pending is None or self.iteration >= self.grpo.num_iterations:
            self.pending, self.figures = self._rollout_batch(state)
            self.iteration = 0
        self.iteration += 1
        return self.pending

    def after_update(self, state: TrainState) -> None:
        if self.engine is not None:
            self.engine.load_weights(state.params, state.biases)

    def get_state(self) -> dict[str, Any]:
        pending = (
            self.pending if self.pending is not None and self.iteration < self.grpo.num_iterations else None
        )
        return {
            **self.order.get_state(),
            "drawn": self.drawn,
            "iteration": self.iteration,
            "skipped": self.skipped,
            "pending": None if pending is None else _pack(pending),
            "figures": self.figures,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.order.set_state(state)
        self.drawn = int(state["drawn"])
        self.iteration, self.skipped = int(state["iteration"]), int(state["skipped"])
        self.pending = None if state["pending"] is None else _unpack(state["pending"])
        self.figures = dict(state["figures"])

    def metrics(self, step: int) -> dict[str, float]:
        return {
            **self.figures,
            "grpo/skipped_batches": self.skipped,
            "grpo/epochs": self.order.epochs,
        }

    def progress(self) -> dict[str, str]:
        """Reward, accuracy and the rollout/trainer gap of the last rollout batch."""
        f = self.figures
        shown = {
            "reward": ("grpo/reward_mean", ".3f"),
            "acc": ("grpo/accuracy", ".3f"),
            "gap": ("grpo/gap_mean", ".1e"),
        }
        return {name: format(f[key], spec) for name, (key, spec) in shown.items() if key in f}

    # ------------------------------------------------------------------ rollouts
    def _engine(self, state: TrainState) -> Engine:
        if self.engine is None:
            if self.program is None:
                raise RuntimeError("Rollouts.next before use_program: train() hands the program over first")
            program = self.program.with_impl(inference_impl(self.program.cfg.impl))
            self.engine = Engine.from_program(
                program,
                state.params,
                state.biases,
                tokenizer=self.tokenizer,
                infer=rollout_infer(self.infer, self.train),
            )
        return self.engine

    def _response(self, completion: Completion) -> str:
        """The completion's text without the end token that stopped it (what rewards read)."""
        ids = completion.output_ids
        ended = completion.finish_reason == "stop" and ids and ids[-1] in self.stop
        return self.tokenizer.decode(ids[:-1] if ended else ids)

    def _sample(self, state: TrainState, count: int) -> Sampled:
        """G completions of each of `count` new prompts, scored."""
        grpo, g = self.grpo, self.grpo.group_size
        indices = self.order.take(count)
        params = [
            SamplingParams(
                max_new_tokens=grpo.max_completion_tokens,
                temperature=grpo.temperature,
                top_p=grpo.top_p,
                top_k=grpo.top_k,
                n=g,
                seed=(self.train.seed * 2**24 + (self.drawn + k) * g) % 2**32,
                stop_token_ids=self.stop,
                record_routing=grpo.routing_replay,
                tempered_logprobs=True,
            )
            for k in range(count)
        ]
        self.drawn += count
        rows, prompts = [self.rows[i] for i in indices], [self.prompt_ids[i] for i in indices]
        t0 = time.perf_counter()
        completions = self._engine(state).generate(prompts, params)
        seconds = time.perf_counter() - t0
        texts, lengths, truncated = [], [], []
        for c in completions:
            if c.finish_reason == "error":
                raise ValueError(f"grpo: the engine refused a rollout: {c.error}")
            texts.append(self._response(c))
            lengths.append(len(c.output_ids))
            truncated.append(c.finish_reason == "length")
        repeated = [row for row in rows for _ in range(g)]
        columns = sorted({key for row in rows for key in row} - {"prompt"})
        scores = self.rewards.score(
            [row["prompt"] for row in repeated],
            texts,
            completion_ids=[list(c.output_ids) for c in completions],
            **{column: [row.get(column) for row in repeated] for column in columns},
        )
        reward = np.array([np.nan if r is None else r for r in scores.reward], np.float64)
        lengths = np.array(lengths)
        reward = reward + overlong_penalty(
            lengths, grpo.max_completion_tokens, grpo.overlong_buffer, grpo.overlong_penalty
        )
        return Sampled(
            rows, prompts, completions, reward, scores.by_function, lengths, np.array(truncated), seconds
        )

    def _rollout_batch(self, state: TrainState) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The next batch with a learning signal (dynamic sampling refills and skips; module docstring)."""
        grpo, g = self.grpo, self.grpo.group_size
        in_a_row = 0
        while True:
            rounds = [self._sample(state, self.per_step)]
            if grpo.dynamic_sampling:
                kept = lambda: sum(int(spread_groups(s.reward, g).sum()) for s in rounds)  # noqa: E731
                while kept() < self.per_step and len(rounds) <= grpo.max_refills:
                    rounds.append(self._sample(state, self.per_step))
                if kept() == 0:
                    self.skipped += 1
                    in_a_row += 1
                    log.warning(
                        "grpo: every group of a rollout batch has equal rewards (dynamic sampling left none): "
                        "batch skipped (%d so far)", self.skipped,
                    )  # fmt: skip
                    if in_a_row > self.train.max_skipped_steps:
                        raise DataError(
                            f"grpo: {in_a_row} rollout batches in a row had no group with unequal rewards "
                            f"(train.max_skipped_steps={self.train.max_skipped_steps}): the rewards give no "
                            "learning signal; check grpo.rewards and the prompts"
                        )
                    continue
            return self._assemble(state, rounds)

    def _assemble(
        self, state: TrainState, rounds: list[Sampled]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """(the batch of the kept groups, the rollout's figures)."""
        grpo, g, seq = self.grpo, self.grpo.group_size, self.train.seq_len
        groups = []  # (round, group index) of the groups that enter the batch
        for r, s in enumerate(rounds):
            keep = spread_groups(s.reward, g) if grpo.dynamic_sampling else np.ones(len(s.rows), bool)
            groups += [(r, k) for k in np.flatnonzero(keep)]
        groups = groups[: self.per_step]
        batch = {k: np.zeros((self.train.global_batch, seq), dtype) for k, dtype in self.spec.items()}
        if "routed_experts" in batch:  # padding positions replay expert 0 (any valid id)
            cfg = self.program.cfg.model
            shape = (self.train.global_batch, seq, cfg.num_moe_layers, cfg.num_experts_per_tok)
            batch["routed_experts"] = np.zeros(shape, np.int32)
        sampler = np.zeros((self.train.global_batch, seq), np.float32)
        generated = np.zeros((self.train.global_batch, seq), bool)  # targets that are completion tokens
        advantages = [group_advantages(s.reward, g, grpo.scale_rewards) for s in rounds]
        training = [trains(s.reward, s.truncated, grpo.mask_truncated) for s in rounds]
        row = 0
        for r, k in groups:
            s = rounds[r]
            for j in range(k * g, (k + 1) * g):
                prompt, completion = s.prompts[k], s.completions[j]
                ids = prompt + list(completion.output_ids)
                n, start = len(ids), len(prompt) - 1  # target t = ids[t + 1]: completion targets from start
                batch["input_ids"][row, :n] = ids
                batch["targets"][row, : n - 1] = ids[1:]
                batch["positions"][row] = np.arange(seq)
                batch["segment_ids"][row, :n] = 1
                span = slice(start, start + len(completion.output_ids))
                batch["completion_mask"][row, span] = float(training[r][j])
                batch["advantages"][row, span] = advantages[r][j]
                sampler[row, span] = completion.tempered_logprobs
                if "routed_experts" in batch:  # row t: the experts of input token ids[t], t < n - 1
                    batch["routed_experts"][row, : n - 1] = completion.routed_experts
                generated[row, span] = True
                row += 1
        if "sampler_logprobs" in batch:
            batch["sampler_logprobs"] = sampler
        forward_keys = ("input_ids", "targets", "positions", "segment_ids", "routed_experts")
        on_device = device_batch({k: batch[k] for k in forward_keys if k in batch}, self.sharding)
        old, _ = self.logprobs(state.params, state.biases, on_device)
        batch["old_logprobs"] = np.asarray(jax.device_get(old), np.float32)
        if "ref_logprobs" in batch:
            ref, _ = self.logprobs(state.extra["reference"], state.biases, on_device)
            batch["ref_logprobs"] = np.asarray(jax.device_get(ref), np.float32)
        return batch, self._figures(rounds, groups, batch["old_logprobs"], sampler, generated)

    def _figures(
        self, rounds: list[Sampled], groups: list, old: np.ndarray, sampler: np.ndarray, generated: np.ndarray
    ) -> dict[str, float]:
        """The rollout's metrics (module docstring of the CLI: README "GRPO")."""
        g = self.grpo.group_size
        reward = np.concatenate([s.reward for s in rounds])
        scored = reward[~np.isnan(reward)]
        out = {
            "grpo/reward_mean": float(scored.mean()) if scored.size else math.nan,
            "grpo/reward_std": float(scored.std()) if scored.size else math.nan,
            "grpo/unscored": int(np.isnan(reward).sum()),
            "grpo/zero_spread_groups": float(
                1 - np.mean(np.concatenate([spread_groups(s.reward, g) for s in rounds]))
            ),
            "grpo/groups": len(groups),
            "grpo/rounds": len(rounds),
        }
        first = None
        for name in rounds[0].by_function:
            values = np.array(
                [np.nan if v is None else v for s in rounds for v in s.by_function[name]], np.float64
            )
            ok = values[~np.isnan(values)]
            out[f"grpo/reward/{name}_mean"] = float(ok.mean()) if ok.size else math.nan
            out[f"grpo/reward/{name}_std"] = float(ok.std()) if ok.size else math.nan
            first = values if first is None else first
        out["grpo/accuracy"] = (
            float(np.nanmean(first >= 1)) if first is not None and (~np.isnan(first)).any() else math.nan
        )
        lengths = np.concatenate([s.lengths for s in rounds])
        out.update(
            {
                "grpo/completion_len_mean": float(lengths.mean()),
                "grpo/completion_len_max": int(lengths.max()),
                "grpo/truncated": float(np.concatenate([s.truncated for s in rounds]).mean()),
                "grpo/rollout_tokens_per_s": float(lengths.sum() / max(sum(s.seconds for s in rounds), 1e-9)),
            }
        )
        gap = np.abs(sampler - old)[generated]
        if gap.size:
            out["grpo/gap_mean"] = float(gap.mean())
            out["grpo/gap_max"] = float(gap.max())
        return out

    # ------------------------------------------------------------------ held-out evaluation
    def evaluator(self):
        """`train`'s evaluate hook: greedy completions of the held-out prompts (grpo.held_out) through
        the rollout engine (the current weights), scored: {"eval/reward", "eval/accuracy"}; None without
        grpo.held_out."""
        if not self.grpo.held_out:
            return None
        if self.grpo.held_out == CHAT_ARITHMETIC:
            rows = [p.row() for p in held_out_problems(Difficulty(), self.grpo.held_out_count)]
        else:
            from frontier_jax.posttrain.cli import read_jsonl

            rows = read_jsonl(self.grpo.held_out, ("prompt",))[: self.grpo.held_out_count]
        room = self.train.seq_len - self.grpo.max_completion_tokens
        prompts = encode_prompts(rows, self.tokenizer, self.template, room, "grpo.held_out")
        greedy = SamplingParams(max_new_tokens=self.grpo.max_completion_tokens, stop_token_ids=self.stop)
        columns = sorted({key for row in rows for key in row} - {"prompt"})

        def evaluate(program, params, biases) -> dict:
            completions = self.engine.generate(prompts, greedy)
            texts = [self._response(c) for c in completions]
            scores = self.rewards.score(
                [row["prompt"] for row in rows], texts, completion_ids=[list(c.output_ids) for c in completions],
                **{column: [row.get(column) for row in rows] for column in columns},
            )  # fmt: skip
            first = next(iter(scores.by_function.values()))
            reward = [r for r in scores.reward if r is not None]
            return {
                "eval/reward": float(np.mean(reward)) if reward else math.nan,
                "eval/accuracy": float(np.mean([v is not None and v >= 1 for v in first])),
            }

        return evaluate
