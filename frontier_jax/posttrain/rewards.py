"""Reward functions: one signature, a registry of named functions, and their weighted sum.

A reward function has the signature of TRL's `GRPOTrainer` `reward_funcs` and Tunix's reward
functions:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are the records' other fields, each a list as long as `completions` (`answer`,
`tests`, ...); functions ignore the ones they do not read.  `None` means "no score" (the sample
does not apply or scoring failed), never 0.

`RewardSet` calls each configured function on a batch in isolation: a function that raises gives
`None` to every sample of that call, one that runs past `timeout_s` gives `None` to the samples it
has not returned (both counted in `failures` and logged), and the combined reward of sample i is

    reward_i = sum_{f : r_f,i is not None} w_f r_f,i     (None where every r_f,i is None)

so an infrastructure failure masks a sample out instead of scoring it 0.  A function that returns
a list of the wrong length is a bug of the function: masked and logged as well, or an error naming
the function with `strict_lengths` (GRPO, which trains on every batch it scores).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

log = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> list[float | None]: ...


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One term of the reward: a registered function's name, its weight and its options
    (e.g. `checkpoint` for `model`)."""

    name: str
    weight: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RewardsConfig:
    """The `rewards:` section: `functions: [{name: math, weight: 1.0}, {name: format, weight: 0.2}]`."""

    functions: tuple[RewardSpec, ...] = ()
    timeout_s: float = 120.0  # per function per batch
    unconfined_sandbox: bool = False  # allow `code` where no confining sandbox tier exists
    workers: int = 2  # processes / sandboxes run at once by `math` and `code`

    @classmethod
    def from_dict(cls, raw: Mapping | Sequence) -> RewardsConfig:
        """From YAML / JSON: `functions` entries are names or `{name, weight, ...options}`; a list
        alone is the functions (`rewards: [{name: math, weight: 1.0}, {name: format, weight: 0.2}]`)."""
        raw = {"functions": list(raw)} if isinstance(raw, list | tuple) else dict(raw)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(
                f"rewards: unknown field(s) {sorted(unknown)}; known: functions, timeout_s, unconfined_sandbox, workers"
            )
        specs = []
        for i, entry in enumerate(raw.pop("functions", ())):
            entry = {"name": entry} if isinstance(entry, str) else dict(entry)
            if "name" not in entry:
                raise ValueError(
                    f"rewards.functions[{i}]: no `name` (a registered reward: {', '.join(registered())})"
                )
            name, weight = entry.pop("name"), entry.pop("weight", 1.0)
            if not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"rewards.functions[{i}] ({name}): weight {weight!r} is not a finite number")
            specs.append(RewardSpec(str(name), float(weight), entry))
        return cls(functions=tuple(specs), **raw)

    @classmethod
    def parse_names(cls, text: str, **fields) -> RewardsConfig:
        """`math,format:0.2` -> math weight 1, format weight 0.2 (the CLIs' `--rewards`)."""
        specs = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, weight = item.partition(":")
            try:
                specs.append(RewardSpec(name, float(weight) if weight else 1.0))
            except ValueError:
                raise ValueError(
                    f"--rewards: weight {weight!r} of {name!r} is not a number (NAME or NAME:WEIGHT)"
                ) from None
        return cls(functions=tuple(specs), **fields)


Builder = Callable[[RewardSpec, RewardsConfig], RewardFn]
_REGISTRY: dict[str, Builder] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, builder: Builder | None = None):
    """Register `fn` (a reward function) or `builder(spec, config) -> fn` under `name`.
    As a decorator: `@register_reward("name")`."""
    if fn is None and builder is None:
        return lambda f: register_reward(name, f) or f
    _REGISTRY[name] = builder if builder is not None else (lambda spec, config: fn)
    return fn


def registered() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def build_reward(spec: RewardSpec, config: RewardsConfig) -> RewardFn:
    if spec.name not in registered():
        raise ValueError(f"unknown reward function {spec.name!r}; registered: {', '.join(registered())}")
    return _REGISTRY[spec.name](spec, config)


def _load_builtins() -> None:
    from frontier_jax.posttrain import builtin_rewards  # noqa: F401  (registers on import)


def _in_thread(fn, *args, **kwargs) -> Future:
    """fn(*args, **kwargs) in a daemon thread of its own: a call that never returns is abandoned
    at its timeout and holds up neither later batches nor the interpreter's exit."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # delivered to the caller, which masks the samples
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name="reward").start()
    return future


@dataclasses.dataclass
class Scores:
    """Per-function scores (name -> one value per sample), the weighted `reward` per sample, and
    the count of `None`s per function."""

    by_function: dict[str, list[float | None]]
    reward: list[float | None]
    none_counts: dict[str, int]


class RewardSet:
    """The configured functions, built once (pools and checkpoints stay loaded between batches)."""

    def __init__(self, config: RewardsConfig, *, strict_lengths: bool = False):
        if not config.functions:
            raise ValueError("rewards: no reward functions configured (e.g. --rewards math,format)")
        names = [spec.name for spec in config.functions]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: a function is listed twice in {names}")
        unknown = [name for name in names if name not in registered()]
        if unknown:
            raise ValueError(f"unknown reward function {unknown[0]!r}; registered: {', '.join(registered())}")
        self.config, self.strict_lengths = config, strict_lengths
        self.functions = {spec.name: build_reward(spec, config) for spec in config.functions}
        self.failures: collections.Counter[str] = collections.Counter()

    def close(self) -> None:
        for fn in self.functions.values():
            if hasattr(fn, "close"):
                fn.close()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence) -> Scores:
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            raise ValueError(
                f"rewards: prompts, completions and columns differ in length ({len(prompts)}, {n}, ...)"
            )
        futures = {
            name: _in_thread(fn, list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
            for name, fn in self.functions.items()
        }
        by_function = {name: self._collect(name, future, n) for name, future in futures.items()}
        weights = {spec.name: spec.weight for spec in self.config.functions}
        reward = []
        for i in range(n):
            terms = [
                weights[name] * values[i] for name, values in by_function.items() if values[i] is not None
            ]
            reward.append(math.fsum(terms) if terms else None)
        none_counts = {name: sum(v is None for v in values) for name, values in by_function.items()}
        return Scores(by_function, reward, none_counts)

    def _collect(self, name: str, future, n: int) -> list[float | None]:
        try:
            values = future.result(timeout=self.config.timeout_s)
        except FutureTimeout:
            self.failures[name] += n
            log.warning(
                "reward %s: no result within %g s: None for %d samples", name, self.config.timeout_s, n
            )
            return [None] * n
        except Exception as e:  # any failure of a reward function masks its samples
            self.failures[name] += n
            log.warning("reward %s raised %s: %s; None for %d samples", name, type(e).__name__, e, n)
            return [None] * n
        values = list(values)
        if len(values) != n:
            if self.strict_lengths:
                raise ValueError(
                    f"reward {name} returned {len(values)} values for {n} completions: a reward function "
                    "returns one value (or None) per completion"
                )
            self.failures[name] += n
            log.warning("reward %s returned %d values for %d samples: None for all", name, len(values), n)
            return [None] * n
        cleaned = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
        self.failures[name] += sum(v is None for v in cleaned) - sum(v is None for v in values)
        return cleaned
