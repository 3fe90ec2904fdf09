"""The embedded default data set: needs no download and ships no text.

- code: the top-level Python standard-library modules of the running
  interpreter (`sysconfig.get_paths()["stdlib"]/*.py`, sorted by name), one
  document per file. Identical on machines with the same Python version.
- math: arithmetic problems with their answers, generated from (seed, index).
"""

from __future__ import annotations

import functools
import pathlib
import random
import sysconfig

import grain

MATH_LENGTH = 2**31 - 1
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def stdlib_code_files() -> list[str]:
    """Sorted paths of the top-level standard-library `.py` files."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))
    if not files:
        raise FileNotFoundError(
            f"no Python files in the standard library folder {stdlib}: the embedded_code "
            "source needs them; use a file source instead."
        )
    return files


def _read_text(path: str) -> str:
    return pathlib.Path(path).read_text(encoding="utf-8")


def code_dataset() -> grain.MapDataset:
    """MapDataset[str] of standard-library source files, one document each."""
    return grain.MapDataset.source(stdlib_code_files()).map(_read_text)


def render_expression(node, parent_op: str | None = None, right: bool = False) -> str:
    """Writes an expression tree (int or (op, left, right)) with the needed parentheses."""
    if isinstance(node, int):
        return str(node)
    op, left, right_node = node
    text = f"{render_expression(left, op)} {op} {render_expression(right_node, op, right=True)}"
    if parent_op is not None and (
        _PRECEDENCE[op] < _PRECEDENCE[parent_op]
        or (right and parent_op == "-" and _PRECEDENCE[op] == _PRECEDENCE[parent_op])
    ):
        return f"({text})"
    return text


def evaluate_expression(node) -> int:
    if isinstance(node, int):
        return node
    op, left, right = node
    a, b = evaluate_expression(left), evaluate_expression(right)
    return a + b if op == "+" else a - b if op == "-" else a * b


def random_expression(rng: random.Random, operations: tuple[int, int], max_operand: int, max_factor: int):
    """An expression tree drawn by `rng`: a first operand in 0..max_operand, then n operations
    (n uniform in the inclusive range `operations`) among + - *, each putting a new operand
    (0..max_factor for a product, else 0..max_operand) on a random side of the tree so far."""
    node = rng.randint(0, max_operand)
    for _ in range(rng.randint(*operations)):
        op = rng.choice("+-*")
        operand = rng.randint(0, max_factor if op == "*" else max_operand)
        node = (op, node, operand) if rng.random() < 0.5 else (op, operand, node)
    return node


def math_problem(seed: int, index: int) -> str:
    """The `index`-th problem of `seed`, e.g. "Q: (37 - 12) * 5 = ?\\nA: 125\\n".

    One to three operations among + - *; operands 0..99 (0..12 for a product).
    """
    node = random_expression(random.Random(seed * 2**64 + index), (1, 3), 99, 12)
    return f"Q: {render_expression(node)} = ?\nA: {evaluate_expression(node)}\n"


def math_dataset(seed: int, length: int = MATH_LENGTH) -> grain.MapDataset:
    """MapDataset[str] of `length` generated math problems."""
    return grain.MapDataset.range(length).map(functools.partial(math_problem, seed))
