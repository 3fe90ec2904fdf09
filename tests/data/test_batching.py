"""The batch-size ramp reads only the rows it uses (`frontier_jax/data/batching.py`).

Reference: the row stream of a fixed-size iterator of the same config (the ramp must read
exactly its first sum_k rows_at(k) rows, in order), and padding rows written out by hand."""

import json

import numpy as np
import pytest

from frontier_jax.data import DataConfig, build_train_iterator

KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
RAMP = [2, 3, 3, 5, 8, 8]  # rows of batches 0..5; global batch 8


def _rows_at(step: int) -> int:
    return RAMP[step]


def _rows(batches) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in KEYS}


@pytest.mark.parametrize("mask_documents", [False, True])
def test_ramp_batches_hold_the_next_rows_of_the_stream_then_padding(mask_documents):
    cfg = DataConfig(mask_documents=mask_documents, max_document_chars=120)
    ramp = build_train_iterator(cfg, seq_len=32, global_batch=8, rows_at=_rows_at)
    fixed = build_train_iterator(cfg, seq_len=32, global_batch=8)
    stream = _rows([next(fixed) for _ in range(sum(RAMP) // 8 + 1)])
    start = 0
    for k, rows in enumerate(RAMP):
        batch = next(ramp)
        for key in KEYS:
            assert batch[key].shape == (8, 32) and batch[key].dtype == np.int32, key
            np.testing.assert_array_equal(
                batch[key][:rows], stream[key][start : start + rows], err_msg=f"batch {k} {key}"
            )
        pad = {key: batch[key][rows:] for key in KEYS}
        assert (
            (pad["loss_mask"] == 0).all()
            and (pad["segment_ids"] == 0).all()
            and (pad["positions"] == 0).all()
        )
        assert (pad["input_ids"] == 256).all() and (pad["targets"] == 256).all()  # the byte tokenizer's pad
        start += rows
    assert start == sum(RAMP)  # rows consumed = the ramp's rows


@pytest.mark.parametrize("taken", [1, 3])
def test_ramp_iterator_resumed_mid_ramp_yields_the_same_next_batches(taken):
    cfg = DataConfig(max_document_chars=120)
    it = build_train_iterator(cfg, seq_len=32, global_batch=8, rows_at=_rows_at)
    for _ in range(taken):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(len(RAMP) - taken)]
    resumed = build_train_iterator(cfg, seq_len=32, global_batch=8, rows_at=_rows_at)
    resumed.set_state(state)
    for k, want in enumerate(expected, start=taken):
        got = next(resumed)
        assert int(got["segment_ids"].any(axis=1).sum()) == RAMP[k]
        for key in KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {k} {key}")


def test_ramp_asking_for_more_rows_than_the_batch_is_rejected():
    it = build_train_iterator(DataConfig(), seq_len=16, global_batch=4, rows_at=lambda _: 5)
    with pytest.raises(ValueError, match=r"batch 0: the ramp asks for 5 rows, outside \[1, global_batch=4\]"):
        next(it)
