"""The expert-load ledger: tokens each MoE layer routed to each expert, over a moving window of
steps, recorded the same way by training (`MoEStats.load` of every step) and inference (the
engine's device-side counts of every scheduler step):

    window load [L, E] = sum of the last W steps' loads,  window tokens = sum of their tokens

with W = experts.window_steps; load.sum(1) = K x tokens (top-K assignments, before any
capacity drop).  A step's load may be a device array: it is read only when the window or the
total is asked for, so recording never waits for the device.

Files (`save_expert_load`, `read_expert_load`): `.npz` with arrays `load` [L, E] and `tokens`
(a scalar) of the window, and its steps `step_loads` [n, L, E] and `step_tokens` [n]; or `.json`
{"load": [[...]], "tokens": n}; a plain `.npy` [L, E] array reads with tokens unknown (None).
"""

from __future__ import annotations

import collections
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from etils import epath

SUFFIXES = (".npz", ".json", ".npy")
EXPERT_LOAD_FILE = "expert_load.npz"  # the window saved in each training checkpoint step


@dataclass
class ExpertsConfig:
    """window_steps: the expert-load ledger sums the last window_steps steps (training steps,
    or the inference engine's scheduler steps)."""

    window_steps: int = 100

    def validate(self) -> ExpertsConfig:
        if not isinstance(self.window_steps, int) or self.window_steps < 1:
            raise ValueError(f"experts.window_steps={self.window_steps!r} must be an integer >= 1")
        return self


class ExpertLoad(NamedTuple):
    load: np.ndarray  # [L_moe, N_r] assignments per expert of each MoE layer
    tokens: int | None  # positions counted (None: unknown, a plain .npy array)


class LedgerSteps(NamedTuple):
    """The steps of a ledger's window, oldest first."""

    loads: np.ndarray  # [n, L_moe, N_r] int64
    tokens: np.ndarray  # [n] int64

    def window(self) -> ExpertLoad:
        return ExpertLoad(self.loads.sum(0), int(self.tokens.sum()))


class ExpertLedger:
    """Per-step expert loads [num_layers, num_experts] over a moving window of `window_steps`
    steps (module docstring), and their total since the ledger was made or reset."""

    def __init__(self, num_layers: int, num_experts: int, window_steps: int):
        ExpertsConfig(window_steps).validate()
        self.shape = (num_layers, num_experts)
        self.window_steps = window_steps
        self._steps: collections.deque = collections.deque()
        self._retired = np.zeros(self.shape, np.int64)  # sum of the steps that left the window
        self._retired_tokens = 0

    def record(self, load, tokens: int) -> None:
        """One step's load [L, E] (numpy or a device array) over `tokens` counted positions."""
        if tuple(load.shape) != self.shape:
            raise ValueError(f"expert load of shape {tuple(load.shape)} recorded in a ledger of {self.shape}")
        self._steps.append((load, int(tokens)))
        if len(self._steps) > self.window_steps:
            old, old_tokens = self._steps.popleft()
            self._retired += np.asarray(old, np.int64)
            self._retired_tokens += old_tokens

    def steps(self) -> LedgerSteps:
        """The last `window_steps` recorded steps, read from the device where they are there."""
        return LedgerSteps(
            np.asarray([np.asarray(load, np.int64) for load, _ in self._steps], np.int64).reshape(
                -1, *self.shape
            ),
            np.asarray([tokens for _, tokens in self._steps], np.int64),
        )

    def extend(self, steps: LedgerSteps) -> None:
        """Records `steps` in order (a window read back from a checkpoint)."""
        for load, tokens in zip(steps.loads, steps.tokens):
            self.record(load, int(tokens))

    def window(self) -> ExpertLoad:
        """The sum over the last `window_steps` recorded steps (zeros before any)."""
        return self.steps().window()

    def total(self) -> ExpertLoad:
        """The sum over every step recorded since the ledger was made or reset."""
        window = self.window()
        return ExpertLoad(window.load + self._retired, window.tokens + self._retired_tokens)

    def reset(self) -> None:
        self._steps.clear()
        self._retired[:] = 0
        self._retired_tokens = 0


def _check_suffix(path: epath.Path | Path, suffixes: tuple[str, ...]) -> None:
    if path.suffix not in suffixes:
        raise ValueError(f"{path}: expert stats files end in {' or '.join(suffixes)}, not {path.suffix!r}")


def check_stats_path(path: str | os.PathLike) -> None:
    """ValueError before any work when `save_expert_load` cannot write `path`."""
    path = epath.Path(path)
    _check_suffix(path, SUFFIXES[:2])
    if not path.parent.is_dir():
        raise ValueError(f"{path}: its directory {path.parent} does not exist")


def save_expert_load(path: str | os.PathLike, steps: LedgerSteps) -> None:
    """Writes the window of `steps` as .npz or .json by the suffix of `path` (module docstring;
    a local or a cloud path); the .npz also holds the steps themselves (`step_loads` [n, L, E],
    `step_tokens` [n]), from which `read_ledger_steps` refills a ledger."""
    path = epath.Path(path)
    check_stats_path(path)
    window = steps.window()
    if path.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(
            buffer,
            load=window.load,
            tokens=np.int64(window.tokens),
            step_loads=steps.loads,
            step_tokens=steps.tokens,
        )
        path.write_bytes(buffer.getvalue())
    else:
        path.write_text(json.dumps({"load": window.load.tolist(), "tokens": window.tokens}) + "\n")


def read_ledger_steps(path: str | os.PathLike) -> LedgerSteps:
    """The steps in an .npz that `save_expert_load` wrote (e.g. a checkpoint's expert_load.npz)."""
    with epath.Path(path).open("rb") as handle, np.load(handle) as data:
        return LedgerSteps(data["step_loads"].astype(np.int64), data["step_tokens"].astype(np.int64))


def read_expert_load(path: str | Path) -> ExpertLoad:
    """The ledger dump at `path` (.npz / .json) or a plain [layers, experts] .npy array; a
    ValueError naming the file and the problem otherwise."""
    path = Path(path)
    _check_suffix(path, SUFFIXES)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                load, tokens = data["load"], int(data["tokens"])
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            load, tokens = np.asarray(data["load"]), int(data["tokens"])
        else:
            load, tokens = np.load(path), None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an expert stats file ({type(err).__name__}: {err})") from None
    if load.ndim != 2 or not np.issubdtype(load.dtype, np.number):
        raise ValueError(
            f"{path}: expert load must be a numeric [layers, experts] array, got shape {load.shape}"
        )
    return ExpertLoad(load, tokens)
