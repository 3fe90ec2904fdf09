"""Saving and restoring the position of the training data iterator.

`it.get_state()` is a JSON-serialisable dict (it also carries the data stats);
a fresh iterator built from the same `DataConfig` and arguments, given that
state through `set_state`, yields exactly the batch that would have come next.

With an orbax `CheckpointManager`, put the iterator next to the train state:
    mngr.save(step, args=ocp.args.Composite(state=..., data=orbax_save_args(it)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data=orbax_restore_args(it)))
grain's handler writes one `process_<i>-of-<n>.json` per JAX process.
"""

from __future__ import annotations

import json
import os

import grain


def save_iterator_state(it: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Writes `it.get_state()` to the JSON file `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(it.get_state(), f)


def restore_iterator_state(it: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Sets `it` to the state saved in the JSON file `path`."""
    with open(path, encoding="utf-8") as f:
        it.set_state(json.load(f))


def orbax_save_args(it: grain.DatasetIterator) -> "grain.checkpoint.CheckpointSave":
    """orbax `CheckpointArgs` that save `it` (needs orbax-checkpoint installed)."""
    return grain.checkpoint.CheckpointSave(it)


def orbax_restore_args(it: grain.DatasetIterator) -> "grain.checkpoint.CheckpointRestore":
    """orbax `CheckpointArgs` that restore `it` in place (needs orbax-checkpoint installed)."""
    return grain.checkpoint.CheckpointRestore(it)
