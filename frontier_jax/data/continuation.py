"""Carrying the document stream of one pipeline over to another built for other rows.

A staged run (the trainer's context stages) changes seq_len and global_batch at a step: the
rows are packed afresh at the new length, from the documents the previous stage had not yet
read. The pipeline marks each source's document stream (its screened documents, before
tokenizing and packing) with `DocumentStream`, whose state is {DOCUMENTS_KEY: the stream's
state}, and the batch iterator's step count and mixture counts with POSITION_KEY;
`continue_documents(new, old_state)` sets a freshly built pipeline's document streams and
batch position to those found in the previous pipeline's state, leaving everything between
them (tokenizer buffers, shuffle window, packer) fresh. The batches go on counting steps, so the
mixture schedule and the batch-size ramp see the run's step, not the stage's.

The position carried is where the previous packer (or shuffle window) last restarts from
(they hold documents in their buffers and record the stream's position before them), so those
documents are read again by the new stage; none is skipped. With grain workers every worker
has its own document stream: the i-th stream of the new state gets the i-th of the old one
(the sources and the worker count must not change between the two pipelines).
"""

from __future__ import annotations

import copy
from typing import Any

import grain

DOCUMENTS_KEY = "frontier_documents"
POSITION_KEY = "frontier_batch_position"


class _DocumentStreamIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {DOCUMENTS_KEY: self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state[DOCUMENTS_KEY])


class DocumentStream(grain.IterDataset):
    """Passes the documents of `parent` through; marks its state as the document stream's."""

    def __iter__(self) -> grain.DatasetIterator:
        return _DocumentStreamIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "DocumentStream"


def _marked(state: Any, key: str = DOCUMENTS_KEY) -> list[dict]:
    """The dicts holding `key` in a nested iterator state, in depth-first order."""
    if isinstance(state, dict):
        if key in state:
            return [state]
        return [found for value in state.values() for found in _marked(value, key)]
    if isinstance(state, (list, tuple)):
        return [found for value in state for found in _marked(value, key)]
    return []


def continue_documents(iterator: grain.DatasetIterator, previous_state: dict) -> None:
    """Moves `iterator` (fresh, or anywhere) so that its document stream continues where the
    pipeline whose state is `previous_state` stood; raises ValueError when the two states do
    not hold the same number of document streams (pipelines built with other worker counts)."""
    state = copy.deepcopy(iterator.get_state())
    targets, sources = _marked(state), _marked(previous_state)
    if not sources or len(targets) != len(sources):
        raise ValueError(
            f"cannot continue the document stream: the previous pipeline's state holds "
            f"{len(sources)} document streams, the new one {len(targets)}; build both with the "
            "same data.worker_count"
        )
    for target, source in zip(targets, sources):
        target[DOCUMENTS_KEY] = copy.deepcopy(source[DOCUMENTS_KEY])
    for target, source in zip(_marked(state, POSITION_KEY), _marked(previous_state, POSITION_KEY)):
        target[POSITION_KEY] = copy.deepcopy(source[POSITION_KEY])
    iterator.set_state(state)
