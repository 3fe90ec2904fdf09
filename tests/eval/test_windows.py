"""Sliding windows score every pair exactly once and packing keeps windows apart."""

import numpy as np
import pytest

from frontier_jax.eval.windows import pack_rows, sliding_windows


@pytest.mark.parametrize(
    "n,context,stride", [(1, 4, 4), (10, 4, 4), (10, 4, 1), (10, 4, 3), (9, 16, 8), (17, 5, 2)]
)
def test_windows_score_every_pair_once_with_full_context(n, context, stride):
    ids = np.arange(100, 101 + n)
    scored = np.ones(n, np.int32)
    scored[n // 2] = 0  # a pair that is not scored stays unscored
    windows = sliding_windows(ids, scored, context=context, stride=stride)
    counts = np.zeros(n, int)
    for k, w in enumerate(windows):
        begin = int(w.input_ids[0]) - 100
        assert len(w.input_ids) <= context
        np.testing.assert_array_equal(w.targets, w.input_ids + 1)
        for i in np.flatnonzero(w.scored):
            pair = begin + i
            counts[pair] += 1
            # a scored pair sees min(context, ...) tokens: the most the window allows
            assert i + 1 >= min(pair + 1, context - stride + 1) or k == 0
    np.testing.assert_array_equal(counts, scored)


def test_pack_rows_places_windows_in_their_own_segments():
    a = sliding_windows([1, 2, 3, 4], [1, 1, 1], context=8, stride=8)
    b = sliding_windows([5, 6, 7], [1, 1], context=8, stride=8, sequence=1)
    c = sliding_windows(np.arange(10, 18), np.ones(7), context=8, stride=8, sequence=2)
    rows = pack_rows(a + b + c, context=8, pad_id=99)
    assert rows.placement == [(0, 0), (0, 3), (1, 0)]
    np.testing.assert_array_equal(rows.segment_ids[0], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(rows.positions[0], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows.input_ids[0], [1, 2, 3, 5, 6, 99, 99, 99])
    np.testing.assert_array_equal(rows.scored[1], [1] * 7 + [0])


def test_bad_stride_names_the_bounds():
    with pytest.raises(ValueError, match="stride=5 must be in"):
        sliding_windows([1, 2, 3], [1, 1], context=4, stride=5)
