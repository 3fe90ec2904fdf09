"""Generative chat tasks: a question per row asked as a user turn, answered in a fixed format,
scored greedily and by n samples with unbiased pass@k.

Rows are {"prompt": question, "answer": gold} (the prompt sets of `data.chat_math.write_problems`,
or any JSONL of that shape).  Each prompt is rendered as a generation prompt by the model's chat
template (`data.template.render_prompt`: the tokenizer's template, else the project's format), so
the model sees the bytes it was fine-tuned on; generation stops at the end-of-turn token.

Per row: the greedy completion, and n samples at temperature T, top-p p, each of at most
`max_new_tokens` tokens (24: the byte tokenizer spends one per character, and the longest answer of
the one-operation level, <answer>-1188</answer>, takes 22) (seeded per row: sample
j of row i draws with seed S 2^20 + i n + j, whatever else the engine runs).  A completion's
answer is group 1 of the first match of `answer_pattern` (default <answer>-?N</answer>); it is
correct when that equals the gold answer.  Over the N rows, with c_i correct of n samples:

    exact_match     (1/N) #{greedy answer = gold}
    format_rate     (1/N) #{greedy completion matches answer_pattern}
    pass@k          (1/N) sum_i [1 - C(n - c_i, k) / C(n, k)]   (unbiased, Chen et al. 2021)
    sample_format_rate   share of the N n samples matching answer_pattern
    spread          (1/N) #{0 < c_i < n}: rows whose samples disagree in reward (GRPO learns there)
"""

from __future__ import annotations

import dataclasses
import re
from math import comb
from pathlib import Path

from frontier_jax.data.chat_math import ANSWER_PATTERN, Difficulty, held_out_problems
from frontier_jax.data.jsonl import read_jsonl_objects
from frontier_jax.data.template import ChatTemplate, render_prompt
from frontier_jax.data.tokenizer import END, Tokenizer
from frontier_jax.infer import Engine, SamplingParams

CHAT_BUILTIN = "chat_arithmetic"


@dataclasses.dataclass(frozen=True)
class ChatTask:
    name: str
    rows: list[dict]
    samples: int = 16
    pass_k: tuple[int, ...] = (1, 8)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 24  # byte-level tokens: "<answer>-1188</answer>" is 22
    seed: int = 0
    answer_pattern: str = ANSWER_PATTERN

    def check(self) -> ChatTask:
        bad = [k for k in self.pass_k if not 1 <= k <= self.samples]
        if bad:
            raise ValueError(
                f"task {self.name}: pass@{bad[0]} needs 1 <= k <= samples={self.samples}: raise eval.samples"
            )
        return self


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased P(at least one of k samples drawn without replacement from n is correct), c correct."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def load_chat_rows(path: str | Path) -> list[dict]:
    """The rows of a prompt-set JSONL; each needs string "prompt" and "answer" (an error naming
    FILE:LINE and the field)."""
    rows = []
    for number, row in read_jsonl_objects(path):
        for field in ("prompt", "answer"):
            if not isinstance(row.get(field), (str, int)) or str(row[field]).strip() == "":
                raise ValueError(
                    f"{path}:{number}: field {field!r} is missing or empty (a chat task row needs it)"
                )
        rows.append({"prompt": str(row["prompt"]), "answer": str(row["answer"])})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def chat_task(spec: str, **settings) -> ChatTask:
    """`chat_arithmetic` (500 held-out one-operation problems, `data.chat_math`) or a prompt-set
    JSONL path; settings: samples, pass_k, seed (ChatTask fields)."""
    if spec == CHAT_BUILTIN:
        rows = [p.row() for p in held_out_problems(Difficulty(), 500)]
        return ChatTask(spec, rows, **settings).check()
    return ChatTask(Path(spec).stem, load_chat_rows(spec), **settings).check()


def _answer(pattern: re.Pattern, text: str) -> str | None:
    match = pattern.search(text)
    return None if match is None else match.group(1).strip()


def run_chat(task: ChatTask, engine: Engine, tokenizer: Tokenizer, template: ChatTemplate | None) -> dict:
    """The figures of the module docstring, and the first 5 rows' greedy completions."""
    prompts = [render_prompt(tokenizer, [("user", row["prompt"])], template) for row in task.rows]
    stop = (tokenizer.special_id(END),) if END in tokenizer.special_ids else ()
    greedy_params = SamplingParams(max_new_tokens=task.max_new_tokens, stop_token_ids=stop)
    sample_params = [
        SamplingParams(
            max_new_tokens=task.max_new_tokens,
            temperature=task.temperature,
            top_p=task.top_p,
            n=task.samples,
            seed=task.seed * 2**20 + i * task.samples,
            stop_token_ids=stop,
        )
        for i in range(len(prompts))
    ]
    greedy = engine.generate(prompts, greedy_params)
    sampled = engine.generate(prompts, sample_params)
    for completion in greedy + sampled:
        if completion.finish_reason == "error":
            raise ValueError(f"task {task.name}: {completion.error}")
    pattern = re.compile(task.answer_pattern)
    n, rows = task.samples, len(task.rows)
    hits = formatted = sample_formatted = spread = 0
    pass_sums = dict.fromkeys(task.pass_k, 0.0)
    examples = []
    for i, row in enumerate(task.rows):
        answer = _answer(pattern, greedy[i].text)
        hits += answer == row["answer"]
        formatted += answer is not None
        answers = [_answer(pattern, c.text) for c in sampled[i * n : (i + 1) * n]]
        correct = sum(a == row["answer"] for a in answers)
        sample_formatted += sum(a is not None for a in answers)
        spread += 0 < correct < n
        for k in task.pass_k:
            pass_sums[k] += pass_at_k(n, correct, k)
        if i < 5:
            examples.append({"prompt": row["prompt"], "generation": greedy[i].text, "target": row["answer"]})
    return {
        "exact_match": hits / rows,
        "format_rate": formatted / rows,
        **{f"pass@{k}": total / rows for k, total in pass_sums.items()},
        "sample_format_rate": sample_formatted / (rows * n),
        "spread": spread / rows,
        "rows": rows,
        "samples": n,
        "examples": examples,
    }
