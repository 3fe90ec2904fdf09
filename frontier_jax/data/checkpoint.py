"""Saving and restoring the position of the training data iterator.

`it.get_state()` is a JSON-serialisable dict (it also carries the data stats);
a fresh iterator built from the same `DataConfig` and arguments, given that
state through `set_state`, yields exactly the batch that would have come next.

With an orbax `CheckpointManager`, put the iterator next to the train state:
    mngr.save(step, args=ocp.args.Composite(state=..., data=orbax_save_args(it)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data=orbax_restore_args(it)))
The handler writes one `process_<i>-of-<n>.json` per JAX process, as grain's does.  Every
process runs the same pipeline over the whole global batch (see `pipeline`), so these files
hold the same state, and a restore reads any of them: a run resumes with another process count.
It saves any object with a JSON-serialisable `get_state()` and `set_state(state)` the same way
(the trainer's other batch sources, `train.batches`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
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
    (process 0's when present) instead of requiring this process's index and count, and the
    item is anything whose state is a JSON-serialisable dict (a grain iterator or not)."""

    def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
        item = item or args.item
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (epath.Path(directory) / name).write_text(json.dumps(item.get_state(), indent=4))

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> grain.DatasetIterator:
        item = item or args.item
        saved = sorted(epath.Path(directory).glob("process_*-of-*.json"))
        if not saved:
            raise FileNotFoundError(
                f"data iterator checkpoint {directory} holds no process_*-of-*.json state"
            )
        item.set_state(json.loads(saved[0].read_text()))
        start_prefetch = getattr(item, "start_prefetch", None)  # grain's: read ahead while the model restores
        if start_prefetch is not None:
            start_prefetch()
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
