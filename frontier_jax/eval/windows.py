"""Scoring windows and the rows they are packed into (host-side numpy, no model).

A scored sequence is n + 1 token ids x_0..x_n and a flag per pair i (x_i -> x_{i+1}) saying
whether log p(x_{i+1} | x_0..x_i) counts.  With a context window of T pairs and a stride S,
window k covers the pairs [b_k, e_k) with b_k = k S and e_k = min(b_k + T, n), and scores only
the pairs [e_{k-1}, e_k) that no earlier window scored: every pair is scored exactly once, the
overlap of T - S pairs is context only (the sliding window of "perplexity of fixed-length
models").  The last window ends at n.

Windows are packed in order into rows of T pairs, each window its own segment (segment ids
1, 2, ...; positions restart at 0; attention never crosses a segment), padding segment 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Window:
    """input_ids / targets / scored: int32 [L] (L <= T); `sequence`: the index of the scored
    sequence it belongs to."""

    input_ids: np.ndarray
    targets: np.ndarray
    scored: np.ndarray
    sequence: int


def sliding_windows(ids, scored, *, context: int, stride: int, sequence: int = 0) -> list[Window]:
    """The windows of one sequence: ids [n + 1], scored [n] (0/1 per pair)."""
    ids, scored = np.asarray(ids, np.int32), np.asarray(scored, np.int32)
    n = len(ids) - 1
    if n < 1 or len(scored) != n:
        raise ValueError(
            f"a scored sequence needs >= 2 ids and one flag per pair (got {len(ids)} ids, "
            f"{len(scored)} flags)"
        )
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")
    windows, done, begin = [], 0, 0
    while done < n:
        end = min(begin + context, n)
        flags = scored[begin:end].copy()
        flags[: done - begin] = 0
        windows.append(Window(ids[begin:end], ids[begin + 1 : end + 1], flags, sequence))
        done, begin = end, begin + stride
    return windows


@dataclasses.dataclass(frozen=True)
class Rows:
    """Packed rows [R, T] (int32) and where each window lies: (row, start) per window."""

    input_ids: np.ndarray
    targets: np.ndarray
    scored: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    placement: list[tuple[int, int]]


def pack_rows(windows: list[Window], context: int, pad_id: int = 0) -> Rows:
    """Windows in order into rows of `context` pairs (a new row when the next does not fit)."""
    placement, fill = [], []
    for window in windows:
        length = len(window.input_ids)
        if not fill or fill[-1] + length > context:
            fill.append(0)
        placement.append((len(fill) - 1, fill[-1]))
        fill[-1] += length
    shape = (len(fill), context)
    out = {
        k: np.zeros(shape, np.int32) for k in ("input_ids", "targets", "scored", "segment_ids", "positions")
    }
    out["input_ids"][:] = out["targets"][:] = pad_id
    seg_of_row = [0] * len(fill)
    for window, (row, start) in zip(windows, placement):
        stop = start + len(window.input_ids)
        seg_of_row[row] += 1
        out["input_ids"][row, start:stop] = window.input_ids
        out["targets"][row, start:stop] = window.targets
        out["scored"][row, start:stop] = window.scored
        out["segment_ids"][row, start:stop] = seg_of_row[row]
        out["positions"][row, start:stop] = np.arange(stop - start)
    return Rows(**out, placement=placement)
