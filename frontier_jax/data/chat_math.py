"""The embedded chat arithmetic data set: questions answered in a fixed format, with a held-out split.

A problem is an expression of the embedded generator (`embedded.random_expression`) at a
`Difficulty` (operations, operand range), asked and answered as one chat turn each:

    user       What is 37 - 12?
    assistant  <answer>25</answer>

Held-out problems are a hash bucket of the question text,

    held out  <=>  int(sha256(question)[:8 bytes]) mod HELD_OUT_BUCKETS == 0   (1 in 20),

so a problem is held out whatever the seed, the index or the difficulty that drew it: the
training stream (`train_problem`) redraws every held-out question, and every prompt set built
for fine-tuning, rejection sampling or GRPO drops them (`exclude_held_out`).  The evaluation
set (`held_out_problems`) is the first `count` distinct held-out questions of a fixed seed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grain

from frontier_jax.data.config import Difficulty
from frontier_jax.data.embedded import MATH_LENGTH, evaluate_expression, random_expression, render_expression
from frontier_jax.data.records import Message

HELD_OUT_BUCKETS = 20
HELD_OUT_SEED = 20261207
ANSWER_PATTERN = r"<answer>\s*(-?\d+)\s*</answer>"
_ANSWER = re.compile(ANSWER_PATTERN)
_MAX_DRAWS_PER_PROBLEM = 2000


@dataclasses.dataclass(frozen=True)
class ChatProblem:
    """A question and its gold answer (an integer, as text)."""

    question: str
    answer: str

    def messages(self) -> tuple[Message, ...]:
        """The training chat: the question, then the answer in the fixed format."""
        return (("user", self.question), ("assistant", format_answer(self.answer)))

    def row(self) -> dict:
        """The JSONL row of a prompt set: {"prompt": question, "answer": gold}."""
        return {"prompt": self.question, "answer": self.answer}


def format_answer(answer: str | int) -> str:
    return f"<answer>{answer}</answer>"


def extract_answer(completion: str) -> str | None:
    """The integer inside the first <answer>..</answer> of a completion, or None (format broken)."""
    match = _ANSWER.search(completion)
    return None if match is None else match.group(1)


def is_held_out(question: str) -> bool:
    """Whether a question text is in the held-out bucket (module docstring)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def _draw(rng: random.Random, difficulty: Difficulty) -> ChatProblem:
    node = random_expression(
        rng,
        (difficulty.min_operations, difficulty.max_operations),
        difficulty.max_operand,
        difficulty.max_factor,
    )
    return ChatProblem(f"What is {render_expression(node)}?", str(evaluate_expression(node)))


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(f"chat-math/{seed}/{index}")


def train_problem(seed: int, index: int, difficulty: Difficulty) -> ChatProblem:
    """The `index`-th training problem of `seed`: drawn until its question is not held out."""
    rng = _rng(seed, index)
    for _ in range(_MAX_DRAWS_PER_PROBLEM):
        problem = _draw(rng, difficulty)
        if not is_held_out(problem.question):
            return problem
    raise ValueError(f"difficulty {difficulty}: every question drawn is held out; widen the operand range")


def train_dataset(seed: int, difficulty: Difficulty, length: int = MATH_LENGTH) -> grain.MapDataset:
    """MapDataset[ChatProblem] of `length` training problems (none held out)."""
    return grain.MapDataset.range(length).map(functools.partial(train_problem, seed, difficulty=difficulty))


def train_problems(difficulty: Difficulty, count: int, seed: int) -> list[ChatProblem]:
    """The first `count` training problems of `seed` (a prompt set for sampling; none held out)."""
    return [train_problem(seed, index, difficulty) for index in range(count)]


def held_out_problems(difficulty: Difficulty, count: int, seed: int = HELD_OUT_SEED) -> list[ChatProblem]:
    """The first `count` distinct held-out problems drawn at `difficulty` from `seed`; an error
    when the level has too few distinct held-out questions."""
    rng, seen, problems = random.Random(f"chat-math-held-out/{seed}"), set(), []
    for _ in range(count * HELD_OUT_BUCKETS * 10):
        problem = _draw(rng, difficulty)
        if problem.question not in seen and is_held_out(problem.question):
            seen.add(problem.question)
            problems.append(problem)
            if len(problems) == count:
                return problems
    raise ValueError(
        f"difficulty {difficulty} gave only {len(problems)} distinct held-out problems, fewer than "
        f"{count}: ask for fewer or widen the operand range"
    )


def exclude_held_out(rows: Iterable[Mapping], field: str = "prompt") -> tuple[list[Mapping], int]:
    """(the rows whose `field` is not a held-out question, how many were dropped): apply to every
    prompt set that trains a model (SFT, rejection sampling, GRPO)."""
    kept, dropped = [], 0
    for row in rows:
        if is_held_out(str(row[field])):
            dropped += 1
        else:
            kept.append(row)
    return kept, dropped


def write_problems(path: str | Path, problems: Sequence[ChatProblem]) -> Path:
    """Writes one JSON row per problem, {"prompt", "answer"}, to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.row()) + "\n" for p in problems))
    return path
