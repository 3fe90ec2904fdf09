"""Batches of the mixture, in one shape: the schedule picks each row's source, the batch-size
ramp reads only the rows it uses.

Batch k (the batch of step k, from 0) holds the next `rows_at(k)` rows, each drawn from the
row stream of the source that the mixture schedule picks for it (`mixture.py`, weights of the
stage of step k), followed by `global_batch - rows_at(k)` padding rows (`packing.padding_rows`:
loss_mask 0, segment_ids 0), so the jitted train step sees one shape [global_batch, T]
throughout a ramp (one compilation) while every row read is trained on.  Nothing here depends
on T: the rows may be of another length in another stage of training.

The state is every source's row-stream state after the last batch, the number of batches made
and the rows drawn from each source in each stage, so a restored iterator yields exactly the
next batch, with the next batch's row count and sources, also across a change of weights; a
pipeline of other rows (a context stage) continues its step count and mixture counts
(`continuation.py`).  It also carries the real tokens (segment_ids > 0) read from each source
and the share the schedule asked for (under `stats.MIXTURE_KEY`, read by `DataStats`).
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
        rows_at: Callable[[int], int],
        pad_id: int,
    ):
        self._sources = [sources[name] for name in schedule.names]
        super().__init__(self._sources)
        self._schedule = schedule
        self._global_batch, self._rows_at, self._pad_id = global_batch, rows_at, pad_id
        self._batches = 0
        self._stage_rows = [[0] * len(schedule.names) for _ in schedule.start_steps]
        self._tokens = [0] * len(schedule.names)

    def __next__(self) -> dict[str, np.ndarray]:
        rows = int(self._rows_at(self._batches))
        if not 1 <= rows <= self._global_batch:
            raise ValueError(
                f"batch {self._batches}: the ramp asks for {rows} rows, outside "
                f"[1, global_batch={self._global_batch}]"
            )
        stage = self._schedule.stage_at(self._batches)
        counts = self._stage_rows[stage]
        taken = []
        for _ in range(rows):  # the end of a source's stream drops the incomplete batch
            source = self._schedule.pick(stage, counts)
            row = next(self._sources[source])
            counts[source] += 1
            self._tokens[source] += int(np.count_nonzero(row["segment_ids"]))
            taken.append(row)
        batch = {key: np.stack([row[key] for row in taken]) for key in taken[0]}
        if rows < self._global_batch:
            seq_len = batch["input_ids"].shape[1]
            pad = padding_rows(self._global_batch - rows, seq_len, pad_id=self._pad_id)
            batch = {key: np.concatenate([value, pad[key]]) for key, value in batch.items()}
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        names = self._schedule.names
        target = self._schedule.target_rows(self._stage_rows)
        return {
            "sources": {name: source.get_state() for name, source in zip(names, self._sources)},
            POSITION_KEY: {
                "batches": self._batches,
                "stage_rows": [list(counts) for counts in self._stage_rows],
                "tokens": list(self._tokens),
            },
            stats.MIXTURE_KEY: {
                "tokens": dict(zip(names, self._tokens)),
                "target_share": dict(zip(names, (target / max(target.sum(), 1)).tolist())),
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        position = state.get(POSITION_KEY, {})
        if "sources" not in state or len(position.get("stage_rows", ())) != len(self._stage_rows):
            raise ValueError(
                "the data iterator state was saved by another input pipeline (an older layout, or "
                f"another number of mixture stages than data.stages gives now, {len(self._stage_rows)}):"
                " resume with the data config it was saved with, or restart the data stream"
            )
        for name, source in zip(self._schedule.names, self._sources):
            source.set_state(state["sources"][name])
        self._batches = int(position["batches"])
        self._stage_rows = [[int(c) for c in counts] for counts in position["stage_rows"]]
        self._tokens = [int(t) for t in position["tokens"]]


class MixtureBatchIterDataset(grain.IterDataset):
    """IterDataset of dicts of [global_batch, T] arrays whose first `rows_at(k)` rows (batch k,
    from 0) are drawn from the row streams `sources` ({name: IterDataset of dicts of [T] rows})
    as `schedule` picks, and the rest padding."""

    def __init__(
        self,
        sources: Mapping[str, grain.IterDataset],
        *,
        schedule: MixtureSchedule,
        global_batch: int,
        rows_at: Callable[[int], int],
        pad_id: int,
    ):
        super().__init__([sources[name] for name in schedule.names])
        self._named = dict(sources)
        self._schedule = schedule
        self._global_batch, self._rows_at, self._pad_id = global_batch, rows_at, pad_id

    def __iter__(self) -> grain.DatasetIterator:
        return _MixtureBatchIterator(
            {name: ds.__iter__() for name, ds in self._named.items()},
            self._schedule,
            self._global_batch,
            self._rows_at,
            self._pad_id,
        )

    def __str__(self) -> str:
        names = list(self._schedule.names)
        return f"MixtureBatchIterDataset(sources={names}, global_batch={self._global_batch})"
