"""Batches of a growing number of rows in one shape: the batch-size ramp reads only the rows it uses.

Batch k holds the next `rows_at(k)` rows of the row stream, followed by
`global_batch - rows_at(k)` padding rows (`packing.padding_rows`: loss_mask 0,
segment_ids 0), so the jitted train step sees one shape [global_batch, T] throughout a
ramp (one compilation) while every row read is trained on.  The state is the row
stream's state after the last batch plus the number of batches made, so a restored
iterator yields exactly the next batch, with the next batch's row count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from frontier_jax.data.packing import padding_rows


class _RampBatchIterator(grain.DatasetIterator):
    def __init__(
        self, parent: grain.DatasetIterator, global_batch: int, rows_at: Callable[[int], int], pad_id: int
    ):
        super().__init__(parent)
        self._global_batch, self._rows_at, self._pad_id = global_batch, rows_at, pad_id
        self._batches = 0

    def __next__(self) -> dict[str, np.ndarray]:
        rows = int(self._rows_at(self._batches))
        if not 1 <= rows <= self._global_batch:
            raise ValueError(
                f"batch {self._batches}: the ramp asks for {rows} rows, outside "
                f"[1, global_batch={self._global_batch}]"
            )
        taken = [next(self._parent) for _ in range(rows)]  # the stream's end drops the incomplete batch
        batch = {key: np.stack([row[key] for row in taken]) for key in taken[0]}
        if rows < self._global_batch:
            seq_len = batch["input_ids"].shape[1]
            pad = padding_rows(self._global_batch - rows, seq_len, pad_id=self._pad_id)
            batch = {key: np.concatenate([value, pad[key]]) for key, value in batch.items()}
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"rows": self._parent.get_state(), "batches": self._batches}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["rows"])
        self._batches = int(state["batches"])


class RampBatchIterDataset(grain.IterDataset):
    """IterDataset of dicts of [global_batch, T] arrays whose first `rows_at(k)` rows (batch k,
    from 0) are read from `parent` (an IterDataset of dicts of [T] rows) and the rest padding."""

    def __init__(
        self, parent: grain.IterDataset, *, global_batch: int, rows_at: Callable[[int], int], pad_id: int
    ):
        super().__init__(parent)
        self._global_batch, self._rows_at, self._pad_id = global_batch, rows_at, pad_id

    def __iter__(self) -> grain.DatasetIterator:
        return _RampBatchIterator(self._parent.__iter__(), self._global_batch, self._rows_at, self._pad_id)

    def __str__(self) -> str:
        return f"RampBatchIterDataset(global_batch={self._global_batch})"
