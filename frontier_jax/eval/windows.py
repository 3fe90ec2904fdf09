"""Scoring windows and the rows they are packed into (host-side numpy, no model).

A scored sequence is n + 1 token ids x_0..x_n and a flag per pair i (x_i -> x_{i+1}) saying
whether log p(x_{i+1} | x_0..x_i) counts.  With a context window of T pairs and a stride S,
window k covers the pairs [b_k, e_k) with b_k = k S and e_k = min(b_k + T, n), and scores only
the pairs [e_{k-1}, e_k) that no earlier window scored: every pair is scored exactly once, the
overlap of T - S pairs is context only (the sliding window of "perplexity of fixed-length
models").  The last window ends at n.

A continuation c_1..c_m after a context a_1..a_k is scored in one window (`continuation_window`):
the last T + 1 ids of a + c, flags on the last m pairs, so the sum is
sum_i log p(c_i | a, c_<i) with the context cut from the left to fit.  It needs k >= 1 and
1 <= m <= T, as lm-eval's `hf` backend asserts: an empty continuation would score nothing, and
one longer than the window would lose its own first tokens.

Windows are packed in order into rows of T pairs, each window its own segment (segment ids
1, 2, ...; positions restart at 0; attention never crosses a segment), padding segment 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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


def continuation_window(
    context: Sequence[int], continuation: Sequence[int], *, window: int, sequence: int = 0, name: str = ""
) -> Window:
    """The window scoring `continuation` after `context` (module docstring); `name` says which
    request a refusal is about."""
    if not continuation:
        raise ValueError(
            f"{name}: the continuation has no token of its own (it is empty, or the tokenizer merged "
            "it into the context's last token), so nothing would be scored; lm-eval's hf backend "
            "refuses it too"
        )
    if len(continuation) > window:
        raise ValueError(
            f"{name}: the continuation has {len(continuation)} tokens, more than the {window}-token "
            "window; lm-eval's hf backend refuses it too: widen the window or shorten the continuation"
        )
    if not context:
        raise ValueError(f"{name}: the context has no token; give at least one (e.g. <bos>)")
    ids = np.asarray((list(context) + list(continuation))[-(window + 1) :], np.int32)
    scored = np.zeros(len(ids) - 1, np.int32)
    scored[-len(continuation) :] = 1
    return Window(ids[:-1], ids[1:], scored, sequence)


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
