"""Screening: Records in, documents out; bad records skipped and counted.

A document is a plain text (str) or the messages of a structured record (a tuple of
(role, content) pairs, see `records.py`).
- a record with a `problem` (invalid UTF-8, invalid JSON, missing field, wrong type, an empty
  message, a chat without an assistant turn: the log line names the field),
  an empty (whitespace-only) text, or one shorter than `min_chars`: skipped. The text
  of a structured record is the concatenation of its contents.
- a plain text longer than `max_chars`: split into consecutive pieces of `max_chars`
  characters (the last one shorter), each emitted as a document of its own;
  nothing is dropped. Structured records are never split (the packer cuts every
  document into chunks of seq_len tokens).
A prepared record (`Record.rendered`) was screened at preparation: it passes as it is.
Every outcome is counted (see `stats.COUNTERS`); the first few skipped records
of each source are logged with their origin ("file:line" or "file#index").
A source that skips `max_skipped_in_a_row` records in a row without emitting a
document raises `DataError` naming the source and its counts (a source of only
bad records, repeated forever, would otherwise keep the mixture waiting for ever).
"""

from __future__ import annotations

import logging
from typing import Any

import grain

from frontier_jax.data import stats
from frontier_jax.data.records import Record
from frontier_jax.data.template import Document

_LOGGED_PER_SOURCE = 5
_log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data cannot feed training (e.g. a source that yields no document)."""


def screen(record: Record, *, min_chars: int, max_chars: int) -> tuple[list[Document], list[str]]:
    """Returns (documents to emit, counters to increment) for one record."""
    if record.rendered is not None:
        return [record.rendered], [stats.DOCUMENTS]
    if record.problem is not None:
        return [], [record.problem]
    structured = record.messages is not None
    text = "".join(content for _, content in record.messages) if structured else record.text
    if not text.strip():
        return [], [stats.EMPTY]
    if len(text) < min_chars:
        return [], [stats.TOO_SHORT]
    if structured:
        return [record.messages], [stats.DOCUMENTS]
    if len(text) > max_chars:
        pieces = [text[i : i + max_chars] for i in range(0, len(text), max_chars)]
        return pieces, [stats.DOCUMENTS, stats.SPLIT_OVERLONG]
    return [text], [stats.DOCUMENTS]


class _ScreenIterator(grain.DatasetIterator):
    """State: parent state before the current record, pieces of it already emitted, counts."""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        source: str,
        min_chars: int,
        max_chars: int,
        max_skipped_in_a_row: int,
        records_per_epoch: int,
    ):
        super().__init__(parent)
        self._source = source
        self._records_per_epoch = records_per_epoch
        self._limits = {"min_chars": min_chars, "max_chars": max_chars}
        self._max_skipped_in_a_row = max_skipped_in_a_row
        self._record_state = parent.get_state()
        self._pieces: list[Document] = []
        self._next_piece = 0
        self._counts = stats.zero_counts()
        self._logged = 0

    def __next__(self) -> Document:
        skipped_in_a_row = 0
        while self._next_piece >= len(self._pieces):
            if skipped_in_a_row == self._max_skipped_in_a_row:
                counts = ", ".join(f"{k}={v}" for k, v in self._counts.items() if v)
                raise DataError(
                    f"data source {self._source!r} gave no document in its last {skipped_in_a_row} records "
                    f"(counts so far: {counts}): check its path / text_field, or drop it from data.sources "
                    "(the bound is data.max_skipped_in_a_row)"
                )
            self._record_state = self._parent.get_state()
            self._pieces, self._next_piece = [], 0
            record = next(self._parent)
            self._pieces, counters = screen(record, **self._limits)
            for name in counters:
                self._counts[name] += 1
            if not self._pieces and self._logged < _LOGGED_PER_SOURCE:
                self._logged += 1
                detail = f": {record.detail}" if record.detail else ""
                _log.warning(
                    "data source %r: skipped %s (%s%s)", self._source, record.origin, counters[0], detail
                )
            skipped_in_a_row += not self._pieces
        self._next_piece += 1
        return self._pieces[self._next_piece - 1]

    def get_state(self) -> dict[str, Any]:
        return {
            "record": self._record_state,
            "next_piece": self._next_piece,
            stats.STATS_KEY: {
                "source": self._source,
                "counts": dict(self._counts),
                "records_per_epoch": self._records_per_epoch,
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._record_state = state["record"]
        self._parent.set_state(self._record_state)
        self._counts = stats.zero_counts() | dict(
            state[stats.STATS_KEY]["counts"]
        )  # (saved before a counter existed)
        self._next_piece = state["next_piece"]
        # Re-read the current record (already counted) to recover its pieces.
        self._pieces = screen(next(self._parent), **self._limits)[0] if self._next_piece else []


class ScreenIterDataset(grain.IterDataset):
    """IterDataset[Document] of the documents of an IterDataset[Record] of one source, whose
    every pass holds `records_per_epoch` records (the passes read are counted by `DataStats`)."""

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        source: str,
        min_chars: int,
        max_chars: int,
        max_skipped_in_a_row: int,
        records_per_epoch: int,
    ):
        super().__init__(parent)
        self._source = source
        self._min_chars = min_chars
        self._max_chars = max_chars
        self._max_skipped_in_a_row = max_skipped_in_a_row
        self._records_per_epoch = records_per_epoch

    def __iter__(self) -> grain.DatasetIterator:
        return _ScreenIterator(
            self._parent.__iter__(),
            self._source,
            self._min_chars,
            self._max_chars,
            self._max_skipped_in_a_row,
            self._records_per_epoch,
        )

    def __str__(self) -> str:
        return f"ScreenIterDataset(source={self._source!r})"
