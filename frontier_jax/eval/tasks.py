"""Benchmark tasks from YAML + JSONL files, and the built-in offline arithmetic tasks.

    name: my_task
    type: multiple_choice | generate
    data: path/to/rows.jsonl            # relative to the YAML file; one JSON object per line
    prompt: "Q: {question}\\nA:"         # str.format over the row's fields
    # multiple_choice
    choices: choices                    # the row's field holding the list of continuations
    answer: answer                      # the field holding the index of the right one
    # generate
    target: answer                      # the field holding the expected answer (a string)
    few_shot: 3                         # the first k rows, rendered prompt + " " + target, as examples
    stop: ["\\n"]                        # stop strings of the generation
    extract: "-?\\d+"                    # regex: the first match of the generation is the answer
    max_new_tokens: 16

A task file and every row of its data are checked when it loads, before any model work
(`task_checks.py`: an error names the file, the row as DATA:LINE and the field).

Metrics, over the N rows scored (few-shot rows excluded):
    multiple_choice  acc      = (1/N) #{argmax_c sum_i log p(c_i | prompt) = answer}
                     acc_norm = the same with the sum divided by the choice's UTF-8 bytes
    generate         exact_match = (1/N) #{extract(generation).strip() == target.strip()}
Built-in (`arithmetic`, `arithmetic_choice`): the embedded generator's problems of a held-out
seed, "Q: 3 + 4 = ?\\nA:" -> " 7" (choices: the answer and answer +1, -1, +10).
Chat tasks (`chat.py`): `chat_arithmetic` (the held-out chat arithmetic problems) or a prompt-set
JSONL of {"prompt", "answer"} rows, asked through the chat template, greedy and sampled (pass@k).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import yaml

from frontier_jax.data.embedded import math_problem
from frontier_jax.data.jsonl import read_jsonl_objects
from frontier_jax.data.tokenizer import Tokenizer
from frontier_jax.eval.chat import CHAT_BUILTIN, ChatTask, chat_task
from frontier_jax.eval.config import EvalConfig
from frontier_jax.eval.scorer import Scorer
from frontier_jax.eval.task_checks import check_row, check_settings
from frontier_jax.eval.windows import Window, continuation_window
from frontier_jax.infer import Engine, SamplingParams

TYPES = ("multiple_choice", "generate")
_KEYS = {
    "name",
    "type",
    "data",
    "prompt",
    "choices",
    "answer",
    "target",
    "few_shot",
    "stop",
    "extract",
    "max_new_tokens",
}
BUILTIN = ("arithmetic", "arithmetic_choice", CHAT_BUILTIN)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    type: str
    rows: list[dict]
    prompt: str
    choices: str = "choices"
    answer: str = "answer"
    target: str = "answer"
    few_shot: int = 0
    stop: tuple[str, ...] = ("\n",)
    extract: str | None = None
    max_new_tokens: int = 16

    def render(self, row: dict) -> str:
        try:
            return self.prompt.format(**row)
        except KeyError as err:
            raise ValueError(
                f"task {self.name}: prompt names field {err} that a row lacks (row fields: {sorted(row)})"
            ) from None


def load_task(path: str | Path) -> Task:
    """A task file, checked (`task_checks.py`): errors name the file, the row and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"task file {path}: YAML syntax error: {err}".split("\n")[0]) from None
    if not isinstance(raw, dict):
        raise ValueError(f"task file {path}: the top level must be a mapping (name, type, data, prompt, ...)")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ValueError(f"task file {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    for key in ("type", "data", "prompt"):
        if key not in raw:
            raise ValueError(f"task file {path}: '{key}' is missing")
    if raw["type"] not in TYPES:
        raise ValueError(f"task file {path}: type={raw['type']!r}; allowed: {', '.join(TYPES)}")
    check_settings(raw, path)
    data = path.parent / raw.pop("data")
    if not data.is_file():
        raise FileNotFoundError(f"task file {path}: data file {data} does not exist")
    numbered = read_jsonl_objects(data)
    raw.setdefault("name", path.stem)
    if "stop" in raw:
        raw["stop"] = tuple(raw["stop"])
    task = Task(rows=[row for _, row in numbered], **raw)
    if len(numbered) <= task.few_shot:
        raise ValueError(
            f"task file {path}: {len(numbered)} rows in {data}, but few_shot={task.few_shot} leaves none to score"
        )
    for number, row in numbered:
        check_row(task, row, f"task file {path}: {data}:{number}")
    return task


def builtin_task(name: str, *, rows: int = 50, seed: int = 4321) -> Task:
    """`arithmetic` (generate, 3-shot) or `arithmetic_choice` (multiple choice) of held-out problems."""
    problems = []
    for index in range(rows):
        question, answer = math_problem(seed, index).split("\nA: ")
        problems.append({"question": question[len("Q: ") :], "answer": answer.strip()})
    if name == "arithmetic":
        return Task(
            name, "generate", problems, "Q: {question}\nA:", few_shot=3, extract=r"-?\d+", max_new_tokens=8
        )
    if name == "arithmetic_choice":
        for row in problems:
            value = int(row["answer"])
            row["choices"] = [f" {value + d}" for d in (0, 1, -1, 10)]
            row["answer"] = 0
        return Task(name, "multiple_choice", problems, "Q: {question}\nA:")
    raise ValueError(
        f"unknown task {name!r}: built-in tasks are {', '.join(BUILTIN)}, or give a task YAML path"
    )


def resolve_task(spec: str, cfg: EvalConfig | None = None) -> Task | ChatTask:
    """A task YAML, a chat prompt set (.jsonl, `chat.py`), or a built-in task by name; chat tasks
    sample as cfg (eval.samples, eval.pass_k, eval.sample_seed) says."""
    if spec == CHAT_BUILTIN or spec.endswith(".jsonl"):
        cfg = cfg or EvalConfig()
        return chat_task(spec, samples=cfg.samples, pass_k=tuple(cfg.pass_k), seed=cfg.sample_seed)
    return load_task(spec) if spec.endswith((".yaml", ".yml")) else builtin_task(spec)


def continuation_windows(
    tokenizer: Tokenizer, pairs: list[tuple[str, str]], context: int, names: list[str]
) -> list[Window]:
    """One window per (prompt, continuation): <bos> prompt continuation, scoring the continuation's
    tokens, the prompt cut from the left to the last `context` pairs (`windows.continuation_window`:
    an empty continuation or one longer than the window is refused, naming names[k])."""
    bos = tokenizer.special_id("bos")
    return [
        continuation_window(
            [bos] + tokenizer.encode(prompt),
            tokenizer.encode(continuation),
            window=context,
            sequence=k,
            name=name,
        )
        for k, ((prompt, continuation), name) in enumerate(zip(pairs, names))
    ]


def run_multiple_choice(task: Task, scorer: Scorer, tokenizer: Tokenizer) -> dict:
    rows = task.rows[task.few_shot :]
    pairs, names = [], []
    for k, row in enumerate(rows):
        for choice in row[task.choices]:
            pairs.append((task.render(row), choice))
            names.append(f"task {task.name}, row {task.few_shot + k}, choice {choice!r}")
    windows = continuation_windows(tokenizer, pairs, scorer.context, names)
    sums = [
        float(np.sum(lp[w.scored.astype(bool)], dtype=np.float64))
        for w, (lp, _) in zip(windows, scorer.score(windows, desc=task.name))
    ]
    correct = correct_norm = 0
    cursor = 0
    for row in rows:
        n = len(row[task.choices])
        ll = np.asarray(sums[cursor : cursor + n])
        sizes = np.asarray([len(c.encode("utf-8")) for c in row[task.choices]])
        correct += int(np.argmax(ll) == row[task.answer])
        correct_norm += int(np.argmax(ll / sizes) == row[task.answer])
        cursor += n
    return {"acc": correct / len(rows), "acc_norm": correct_norm / len(rows), "rows": len(rows)}


def extract_answer(task: Task, text: str) -> str:
    if task.extract is None:
        return text.strip()
    match = re.search(task.extract, text)
    return match.group(0) if match else ""


def run_generate(task: Task, engine: Engine) -> dict:
    shots = "".join(f"{task.render(r)} {r[task.target]}\n\n" for r in task.rows[: task.few_shot])
    rows = task.rows[task.few_shot :]
    params = SamplingParams(max_new_tokens=task.max_new_tokens, stop=task.stop)
    completions = engine.generate([shots + task.render(r) for r in rows], params)
    hits, samples = 0, []
    for row, completion in zip(rows, completions):
        if completion.finish_reason == "error":
            raise ValueError(f"task {task.name}: {completion.error}")
        answer = extract_answer(task, completion.text)
        hits += int(answer.strip() == str(row[task.target]).strip())
        samples.append({"generation": completion.text, "answer": answer, "target": row[task.target]})
    return {"exact_match": hits / len(rows), "rows": len(rows), "samples": samples[:5]}
