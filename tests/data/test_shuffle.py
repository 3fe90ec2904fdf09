"""The window shuffle of chunks before packing (`data.shuffle_window`, `packing.pack_documents`):
batches mix documents, nothing is lost or repeated, the order is seeded, and a stream restored
in the middle of a window, or past several, goes on exactly.

Every document is one letter repeated, a different letter per document, so the document of
every token is read off the batch."""

import collections
import json

import numpy as np
import pytest

from frontier_jax.data import build_train_iterator

KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
T = 24
LETTERS = "abcdefghijklmnopqrst"


@pytest.fixture
def long_documents(jsonl_config):
    """long_documents(**data_fields): 20 documents of 10 rows each (one letter each), one source."""

    def make(**fields):
        return jsonl_config({"docs": [letter * (10 * T) for letter in LETTERS]}, **fields)

    return make


def _letters(batch) -> set[str]:
    real = batch["segment_ids"] > 0
    return {chr(i) for i in batch["input_ids"][real] if i < 256}


def _segments(batch) -> list[str]:
    """The text of every segment (a chunk, with mask_documents) of a batch."""
    out = []
    for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            out.append(bytes(i for i in ids[seg == s] if i < 256).decode())
    return out


def test_a_batch_mixes_documents_that_would_otherwise_fill_it_alone(long_documents):
    """In order, 4 rows hold one or two documents (each fills 10 rows); through a window of 100
    chunks (10 documents) they hold several, and each document is spread over many batches."""
    in_order = build_train_iterator(long_documents(shuffle_window=0), seq_len=T, global_batch=4)
    shuffled = build_train_iterator(long_documents(shuffle_window=100), seq_len=T, global_batch=4)
    ordered = [_letters(next(in_order)) for _ in range(10)]
    mixed = [_letters(next(shuffled)) for _ in range(10)]
    assert max(len(s) for s in ordered) <= 2
    assert min(len(s) for s in mixed) >= 3 and np.mean([len(s) for s in mixed]) >= 3.5
    first = next(iter(mixed[0]))
    assert sum(first in s for s in mixed) >= 4  # one document's rows land in many batches


def test_the_shuffled_stream_holds_every_chunk_once_in_a_seeded_order(long_documents):
    """One epoch packed without splitting chunks (mask_documents): the same multiset of chunks as
    in order; the same seed gives the same order, another seed another one."""

    def chunks(**fields):
        it = build_train_iterator(
            long_documents(mask_documents=True, **fields), seq_len=T, global_batch=1, num_epochs=1
        )
        return [segment for batch in it for segment in _segments(batch)]

    in_order = chunks(shuffle_window=0)
    shuffled = chunks(shuffle_window=64, seed=1)
    assert len(in_order) > 200 and collections.Counter(shuffled) == collections.Counter(in_order)
    assert shuffled != in_order
    assert chunks(shuffle_window=64, seed=1) == shuffled
    assert chunks(shuffle_window=64, seed=2) != shuffled


@pytest.mark.parametrize("mask_documents", [False, True])
@pytest.mark.parametrize("taken", [1, 5, 13], ids=["in_first_window", "at_its_end", "windows_later"])
def test_a_stream_restored_mid_window_yields_the_same_next_batches(long_documents, mask_documents, taken):
    """A window of 24 chunks is 6 batches of 4 rows: saved inside the first window, next to its
    end and two windows later (through JSON, as checkpoints store it)."""
    cfg = long_documents(shuffle_window=24, mask_documents=mask_documents)
    it = build_train_iterator(cfg, seq_len=T, global_batch=4)
    for _ in range(taken):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(8)]
    resumed = build_train_iterator(cfg, seq_len=T, global_batch=4)
    resumed.set_state(state)
    for k, want in enumerate(expected):
        got = next(resumed)
        for key in KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {taken + k} {key}")
