"""Batches of the mixture, in one shape: the schedule picks each row's source, the batch-size
ramp reads only the rows it uses.

Batch k (the batch of step k, from 0) holds the next `rows_at(k)` rows, each drawn from the
row stream of the source that the mixture schedule picks for it (`mixture.py`, weights of the
stage of step k), followed by `global_batch - rows_at(k)` padding rows (`packing.padding_rows`:
loss_mask 0, segment_ids 0), so the jitted train step sees one shape [global_batch, T]
throughout a ramp (one compilation) while every row read is trained on.  The mixture counts real
tokens (segment_ids > 0), so T only sets the picks' look-ahead of one full row: a context stage's
pipeline of rows of another length continues the counts of the previous one.

The state is every source's row-stream state after the last batch, the number of batches made
and the real tokens drawn from each source in each stage, so a restored iterator yields exactly
the next batch, with the next batch's row count and sources, also across a change of weights; a
pipeline of other rows (a context stage) continues its step count and mixture counts
(`continuation.py`).  It also carries the real tokens read from each source and the share of
them the schedule asked for (under `stats.MIXTURE_KEY`, read by `DataStats`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from frontier_jax.data import stats
from frontier_jax.data.continuation import POSITION_KEY
from frontier_jax.data.mixture import MixtureSchedule
from frontier_jax.data.packing import padding_rows


class _MixtureBatchIterator(grain.DatasetIterator):
    def __init__(
        self,
        sources: Mapping[str, grain.DatasetIterator],
        schedule: MixtureSchedule,
        global_batch: int,
        seq_len: int,
        rows_at: Callable[[int], int],
        pad_id: int,
    ):
        self._sources = [sources[name] for name in schedule.names]
        super().__init__(self._sources)
        self._schedule = schedule
        self._global_batch, self._seq_len = global_batch, seq_len
        self._rows_at, self._pad_id = rows_at, pad_id
        self._batches = 0
        self._stage_tokens = [[0] * len(schedule.names) for _ in schedule.start_steps]

    def __next__(self) -> dict[str, np.ndarray]:
        rows = int(self._rows_at(self._batches))
        if not 1 <= rows <= self._global_batch:
            raise ValueError(
                f"batch {self._batches}: the ramp asks for {rows} rows, outside "
                f"[1, global_batch={self._global_batch}]"
            )
        stage = self._schedule.phase_at(self._batches)
        tokens = self._stage_tokens[stage]
        taken = []
        for _ in range(rows):  # the end of a source's stream drops the incomplete batch
            source = self._schedule.pick(stage, tokens, self._seq_len)
            row = next(self._sources[source])
            tokens[source] += int(np.count_nonzero(row["segment_ids"]))
            taken.append(row)
        batch = {key: np.stack([row[key] for row in taken]) for key in taken[0]}
        if rows < self._global_batch:
            pad = padding_rows(self._global_batch - rows, self._seq_len, pad_id=self._pad_id)
            batch = {key: np.concatenate([value, pad[key]]) for key, value in batch.items()}
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        names = self._schedule.names
        tokens = np.sum(self._stage_tokens, axis=0).tolist()
        target = self._schedule.target_tokens(self._stage_tokens)
        return {
            "sources": {name: source.get_state() for name, source in zip(names, self._sources)},
            POSITION_KEY: {
                "batches": self._batches,
                "stage_tokens": [list(counts) for counts in self._stage_tokens],
            },
            stats.MIXTURE_KEY: {
                "tokens": dict(zip(names, tokens)),
                "target_share": dict(zip(names, (target / max(target.sum(), 1)).tolist())),
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        position = state.get(POSITION_KEY, {})
        stage_tokens = _stage_tokens(position)
        if "sources" not in state or len(stage_tokens) != len(self._stage_tokens):
            raise ValueError(
                "the data iterator state was saved by another input pipeline (an older layout, or "
                f"another number of mixture stages than data.stages gives now, {len(self._stage_tokens)}):"
                " resume with the data config it was saved with, or restart the data stream"
            )
        for name, source in zip(self._schedule.names, self._sources):
            source.set_state(state["sources"][name])
        self._batches = int(position["batches"])
        self._stage_tokens = stage_tokens


def _stage_tokens(position: dict[str, Any]) -> list[list[int]]:
    """[stages][sources] real tokens drawn, from a batch position; one saved when the mixture
    counted rows ("stage_rows" and the per-source "tokens") gives each stage's rows of a source
    that source's mean real tokens per row (exact for full rows, data.mask_documents=false)."""
    if "stage_tokens" in position:
        return [[int(t) for t in counts] for counts in position["stage_tokens"]]
    rows = np.asarray(position.get("stage_rows", []), np.float64)
    if not rows.size:
        return []
    per_row = np.asarray(position["tokens"], np.float64) / np.maximum(rows.sum(axis=0), 1)
    return np.rint(rows * per_row).astype(int).tolist()


class MixtureBatchIterDataset(grain.IterDataset):
    """IterDataset of dicts of [global_batch, seq_len] arrays whose first `rows_at(k)` rows
    (batch k, from 0) are drawn from the row streams `sources` ({name: IterDataset of dicts of
    [seq_len] rows}) as `schedule` picks, and the rest padding."""

    def __init__(
        self,
        sources: Mapping[str, grain.IterDataset],
        *,
        schedule: MixtureSchedule,
        global_batch: int,
        seq_len: int,
        rows_at: Callable[[int], int],
        pad_id: int,
    ):
        super().__init__([sources[name] for name in schedule.names])
        self._named = dict(sources)
        self._schedule = schedule
        self._global_batch, self._seq_len = global_batch, seq_len
        self._rows_at, self._pad_id = rows_at, pad_id

    def __iter__(self) -> grain.DatasetIterator:
        return _MixtureBatchIterator(
            {name: ds.__iter__() for name, ds in self._named.items()},
            self._schedule,
            self._global_batch,
            self._seq_len,
            self._rows_at,
            self._pad_id,
        )

    def __str__(self) -> str:
        names = list(self._schedule.names)
        return f"MixtureBatchIterDataset(sources={names}, global_batch={self._global_batch})"
