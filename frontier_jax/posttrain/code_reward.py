"""The `code` reward: the completion's Python followed by the record's `tests`, in the sandbox.

program = code_of(completion) + "\n\n" + tests
r = 1 if the sandbox reports every test passed, 0 if it failed, None if it could not start
"""

from __future__ import annotations

from frontier_jax.posttrain.answers import code_of
from frontier_jax.posttrain.sandbox import Sandbox, SandboxLimits


class CodeReward:
    def __init__(self, sandbox: Sandbox, workers: int = 2):
        self.sandbox = sandbox
        self.workers = workers

    def __call__(self, prompts, completions, tests=None, **columns) -> list[float | None]:
        if tests is None:
            raise ValueError("code reward: the records have no `tests` column (Python assertions)")
        rows = [i for i, t in enumerate(tests) if t]
        results = self.sandbox.run_many(
            [f"{code_of(completions[i])}\n\n{tests[i]}\n" for i in rows], self.workers
        )
        scores: list[float | None] = [None] * len(completions)
        for i, result in zip(rows, results):
            scores[i] = None if result.status == "unavailable" else float(result.passed)
        return scores


def limits_from_options(options) -> SandboxLimits:
    """`{name: code, wall_s: 5, memory_bytes: ...}`: the spec's options override the default limits."""
    known = SandboxLimits.__dataclass_fields__
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"rewards code: unknown option(s) {sorted(unknown)}; known: {', '.join(known)}")
    return SandboxLimits(**options)
