"""The files of `frontier-jax generate`: the prompts file it reads and the completions file it
writes.

Prompts file: one JSON object per line, {"prompt": TEXT} or {"prompt_ids": [INT, ...]}; any other
key, a non-string prompt, a non-integer id (1.0 included) or a line that is not UTF-8 JSON is an
error naming the file, the line and the key, raised before the model loads.

Completions file: line k is {"index": k, <Completion fields>} of prompt k, in prompt order; it is
written and flushed as soon as the completions of prompts 0..k are all done, so an interrupted
run keeps every line written.  The path is checked (writable, not a directory) before the model
loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import IO

from frontier_jax.data.jsonl import read_jsonl_objects
from frontier_jax.infer.scheduler import Completion

PROMPT_KEYS = ("prompt", "prompt_ids")


def _prompt_of(record: dict, where: str) -> str | list[int]:
    unknown = sorted(set(record) - set(PROMPT_KEYS))
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r}; a line holds one of {', '.join(map(repr, PROMPT_KEYS))} "
            "(sampling options are command-line flags)"
        )
    if len(record) != 1:
        raise ValueError(f'{where}: give exactly one of "prompt" (text) or "prompt_ids" (ints)')
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError(f'{where}: "prompt" = {record["prompt"]!r} must be a string (ids: "prompt_ids")')
        return record["prompt"]
    ids = record["prompt_ids"]
    if not isinstance(ids, list):
        raise ValueError(f'{where}: "prompt_ids" = {ids!r} must be a list of integer token ids')
    bad = [(j, i) for j, i in enumerate(ids) if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise ValueError(f'{where}: "prompt_ids"[{bad[0][0]}] = {bad[0][1]!r} is not an integer token id')
    return ids


def read_prompts_file(path: str | Path) -> list[str | list[int]]:
    """The prompts of a prompts file (module docstring), checked."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    prompts = [_prompt_of(record, f"{path}:{number}") for number, record in read_jsonl_objects(path)]
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompt")
    return prompts


def check_output_path(path: str | Path) -> None:
    """Raises ValueError naming `path` when a file cannot be written there; leaves an existing
    file as it is and creates none."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a file path, e.g. {path / 'completions.jsonl'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"--out {path}: {path.parent} is a file, not a directory")
    if not path.parent.is_dir():
        raise ValueError(f"--out {path}: the directory {path.parent} does not exist; create it first")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise ValueError(f"--out {path} cannot be written ({err.strerror}); give a writable path") from None
    if not existed:
        path.unlink()


# the Completion fields of an --out line (the log-prob alternatives are the server's)
LINE_FIELDS = ("prompt_ids", "output_ids", "text", "logprobs", "finish_reason", "error")


class CompletionsFile:
    """Writes completions, given in any order, to `file` in prompt order (module docstring)."""

    def __init__(self, file: IO[str]):
        self._file = file
        self._waiting: dict[int, Completion] = {}
        self.written = 0  # lines written: prompts 0..written-1

    def add(self, index: int, completion: Completion) -> None:
        """Queues completion `index`; writes every completion whose predecessors are written."""
        self._waiting[index] = completion
        while self.written in self._waiting:
            completion = dataclasses.asdict(self._waiting.pop(self.written))
            line = {"index": self.written, **{key: completion[key] for key in LINE_FIELDS}}
            self._file.write(json.dumps(line) + "\n")
            self.written += 1
        self._file.flush()
