"""A pipeline of other rows continues the document stream of a previous one (data/continuation.py)."""

import re

import numpy as np
import pytest

from frontier_jax.data import build_train_iterator, byte_tokenizer, continue_documents

_LABEL = re.compile(r"<(\d{3})>")


def _labels(batches) -> list[int]:
    """Document numbers in the rows' text, in reading order (rows of a batch, then batches; a
    label may continue on the next row)."""
    ids = [int(i) for batch in batches for row in batch["input_ids"] for i in row]
    return [int(m) for m in _LABEL.findall(byte_tokenizer().decode(ids))]


@pytest.fixture
def numbered(jsonl_config):
    """One source of 200 documents "<000> ...", each ~30 bytes, in file order (no shuffle)."""
    docs = [f"<{i:03d}> " + "x" * (20 + i % 7) for i in range(200)]
    return jsonl_config({"web": docs}, shuffle=False)


@pytest.mark.parametrize("mask_documents", [False, True])
def test_continued_pipeline_reads_on_from_the_previous_documents(numbered, mask_documents):
    cfg = numbered
    cfg.mask_documents = mask_documents
    first = build_train_iterator(cfg, seq_len=16, global_batch=4)
    seen = _labels([next(first) for _ in range(5)])  # 320 pairs: about 10 documents
    assert seen[0] == 0 and len(seen) >= 5

    second = build_train_iterator(cfg, seq_len=64, global_batch=2)
    continue_documents(second, first.get_state())
    batch = next(second)
    assert batch["input_ids"].shape == (2, 64)  # packed at the new length
    after = _labels([batch, next(second)])
    # the new stage starts within the last few documents the first stage read (those still in
    # its packer's buffer are read again), skips none, and keeps the stream's order
    assert seen[-1] - 3 <= after[0] <= seen[-1] + 1, (seen, after)
    assert after == list(range(after[0], after[0] + len(after)))

    fresh = build_train_iterator(cfg, seq_len=64, global_batch=2)
    assert _labels([next(fresh)])[0] == 0  # without the carry the stream starts again


def test_continued_position_is_part_of_the_new_state(numbered):
    first = build_train_iterator(numbered, seq_len=16, global_batch=4)
    for _ in range(3):
        next(first)
    second = build_train_iterator(numbered, seq_len=32, global_batch=2)
    continue_documents(second, first.get_state())
    next(second)
    saved = second.get_state()
    want = next(second)
    resumed = build_train_iterator(numbered, seq_len=32, global_batch=2)
    resumed.set_state(saved)
    got = next(resumed)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_states_without_a_document_stream_are_refused(numbered):
    it = build_train_iterator(numbered, seq_len=16, global_batch=2)
    with pytest.raises(ValueError, match="0 document streams.*data.worker_count"):
        continue_documents(it, {"rows": {"index": 3}})
