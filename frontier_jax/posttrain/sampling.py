"""Rejection sampling's loop: n samples per prompt from the engine, scored, kept, written.

Prompts are rendered as a user turn by the run's chat template (`chat.prompt_ids`); the n samples
of a prompt are one request with `SamplingParams.n` (its prefill computed once and forked),
prompt i drawing with seed (seed + i n) mod 2^32 (+ j for sample j), so a resumed run draws what
the uninterrupted one would.  Generation stops at the chat's end token (and eos); the response
is the generated text without it.  `batch_prompts` prompts are generated and scored together,
then written in order (`rejection.Writer`), with their preference pairs when `pairs` is given
(`rejection.preference_pairs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from frontier_jax.data.template import ChatTemplate
from frontier_jax.data.tokenizer import END, Tokenizer
from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.posttrain.chat import prompt_ids
from frontier_jax.posttrain.rejection import KeepRules, PairRules, Sample, Writer, preference_pairs, summary
from frontier_jax.posttrain.rewards import RewardSet


def sample_and_keep(
    engine: Engine,
    tokenizer: Tokenizer,
    template: ChatTemplate | None,
    rows: Sequence[Mapping],
    rewards: RewardSet,
    rules: KeepRules,
    writer: Writer,
    params: SamplingParams,
    *,
    batch_prompts: int = 8,
    pairs: PairRules | None = None,
    on_prompt: Callable[[dict], None] | None = None,
) -> dict:
    """Runs the prompts `writer` has not finished; returns `rejection.summary` of all of them."""
    end = tokenizer.special_ids.get(END)
    params = dataclasses.replace(
        params, stop_token_ids=tuple({*params.stop_token_ids, *([end] if end is not None else [])})
    )
    n, base = params.n, params.seed or 0
    columns = sorted({key for row in rows for key in row} - {"prompt"})
    for start in range(writer.done, len(rows), batch_prompts):
        part = rows[start : start + batch_prompts]
        each = [dataclasses.replace(params, seed=(base + (start + k) * n) % 2**32) for k in range(len(part))]
        completions = engine.generate([prompt_ids(tokenizer, template, row["prompt"]) for row in part], each)
        responses, lengths, finished = [], [], []
        for c in completions:
            ids = (
                c.output_ids[:-1]
                if c.finish_reason == "stop" and c.output_ids and c.output_ids[-1] in params.stop_token_ids
                else c.output_ids
            )
            responses.append(tokenizer.decode(ids) if c.finish_reason != "error" else "")
            lengths.append(len(ids))
            finished.append(c.finish_reason == "stop")
        repeated = [row for row in part for _ in range(n)]
        scores = rewards.score(
            [row["prompt"] for row in repeated],
            responses,
            **{column: [row.get(column) for row in repeated] for column in columns},
        )
        for k, row in enumerate(part):
            js = range(k * n, (k + 1) * n)
            samples = [Sample(responses[j], scores.reward[j], lengths[j], finished[j]) for j in js]
            pairs_of_row = (
                preference_pairs(row["prompt"], samples, rules, pairs, pairs.gold(row)) if pairs else []
            )
            line = writer.write(row["prompt"], samples, rules, pairs_of_row)
            if on_prompt is not None:
                on_prompt(line)
    return summary(writer.stats)
