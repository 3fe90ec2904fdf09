"""The `math` reward: the completion's final answer against the gold `answer` with math-verify.

    r = 1 if verify(parse(gold), parse(final_answer(completion))) else 0   (gold first)

math-verify bounds parsing and comparison with SIGALRM, which works only in a process's main
thread, so every sample is verified in a worker of a process pool (forkserver: no fork of a
process holding JAX threads), whose tasks run in the worker's main thread.  A sample whose parse or
comparison runs past `timeout_s`, or whose gold answer math-verify cannot parse, is `None`; a batch still unfinished at its wall-clock deadline
(`timeout_s` x 2 per sample and worker, plus the pool's start) gets `None` for the rest and the
pool is replaced (its workers terminated).  An unparsable answer is 0.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time

from frontier_jax.posttrain.answers import final_answer

log = logging.getLogger(__name__)
_POOL_START_S = 60.0  # spawning workers and importing sympy on a loaded machine


def verify_answer(gold: str, completion: str, timeout_s: int) -> float | None:
    """In a worker: 1.0 / 0.0, or None when math-verify timed out."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        expected = parse(str(gold), parsing_timeout=timeout_s, raise_on_error=True)
        if not expected:
            return None  # a gold answer math-verify cannot read scores nothing
        answer = parse(final_answer(completion), parsing_timeout=timeout_s, raise_on_error=True)
        return float(verify(expected, answer, timeout_seconds=timeout_s, raise_on_error=True))
    except TimeoutException:
        return None
    except Exception:  # math-verify gives up on some inputs (sympy errors): not a correct answer
        return 0.0


def _warm() -> None:
    import math_verify  # noqa: F401


class MathReward:
    """`fn(prompts, completions, answer=[...])`; a record with no gold answer is None."""

    def __init__(self, timeout_s: int = 5, workers: int = 2):
        self.timeout_s = max(1, int(timeout_s))
        self.workers = max(1, workers)
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            self._pool = multiprocessing.get_context("forkserver").Pool(self.workers)
            self._pool.apply_async(_warm).get(timeout=_POOL_START_S)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __call__(self, prompts, completions, answer=None, **columns) -> list[float | None]:
        if answer is None:
            raise ValueError("math reward: the records have no `answer` column (the gold answer)")
        pool = self._get_pool()
        jobs = {
            i: pool.apply_async(verify_answer, (str(gold), completion, self.timeout_s))
            for i, (gold, completion) in enumerate(zip(answer, completions))
            if gold is not None
        }
        budget = 2 * self.timeout_s * math.ceil(max(len(jobs), 1) / self.workers) + 2 * self.timeout_s
        deadline = time.monotonic() + budget
        scores: list[float | None] = [None] * len(completions)
        late = 0
        for i, job in jobs.items():
            try:
                scores[i] = job.get(timeout=max(deadline - time.monotonic(), 0.0))
            except multiprocessing.TimeoutError:
                late += 1
        if late:
            log.warning(
                "math reward: %d samples unfinished after %.0f s: None; restarting its workers", late, budget
            )
            self.close()
        return scores
