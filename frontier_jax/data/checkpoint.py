"""Saving and restoring the position of the training data iterator.

`it.get_state()` is a JSON-serialisable dict (it also carries the data stats);
a fresh iterator built from the same `DataConfig` and arguments, given that
state through `set_state`, yields exactly the batch that would have come next.

With an orbax `CheckpointManager`, put the iterator next to the train state:
    mngr.save(step, args=ocp.args.Composite(state=..., data=orbax_save_args(it)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data=orbax_restore_args(it)))
grain's handler writes one `process_<i>-of-<n>.json` per JAX process.  Every process runs
the same pipeline over the whole global batch (see `pipeline`), so these files hold the
same state, and a restore reads any of them: a run resumes with another process count.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath


def save_iterator_state(it: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Writes `it.get_state()` to the JSON file `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(it.get_state(), f)


def restore_iterator_state(it: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Sets `it` to the state saved in the JSON file `path`."""
    with open(path, encoding="utf-8") as f:
        it.set_state(json.load(f))


class AnyProcessCountHandler(grain.checkpoint.CheckpointHandler):
    """grain's orbax handler, but a restore reads the first saved `process_*-of-*.json`
    (process 0's when present) instead of requiring this process's index and count."""

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> grain.DatasetIterator:
        item = item or args.item
        saved = sorted(epath.Path(directory).glob("process_*-of-*.json"))
        if not saved:
            raise FileNotFoundError(
                f"data iterator checkpoint {directory} holds no process_*-of-*.json state"
            )
        item.set_state(json.loads(saved[0].read_text()))
        item.start_prefetch()  # as grain's restore: the first batch is read while the model restores
        return item


@ocp.args.register_with_handler(AnyProcessCountHandler, for_save=True)
@dataclasses.dataclass
class AnyProcessCountSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(AnyProcessCountHandler, for_restore=True)
@dataclasses.dataclass
class AnyProcessCountRestore(ocp.args.CheckpointArgs):
    item: Any


def orbax_save_args(it: grain.DatasetIterator) -> AnyProcessCountSave:
    """orbax `CheckpointArgs` that save `it` (as grain's handler: one file per process)."""
    return AnyProcessCountSave(it)


def orbax_restore_args(it: grain.DatasetIterator) -> AnyProcessCountRestore:
    """orbax `CheckpointArgs` that restore `it` in place from a checkpoint written by any
    number of processes."""
    return AnyProcessCountRestore(it)
