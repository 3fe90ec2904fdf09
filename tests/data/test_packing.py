import random

import grain
import numpy as np
import pytest

from frontier_jax.data import DataConfig, build_train_iterator, byte_tokenizer
from frontier_jax.data.packing import pack_documents

T = 24
TOK = byte_tokenizer()


def _random_documents(n, seed):
    rng = random.Random(seed)
    alphabet = "abcdefgh ij\né日"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3 * T))) for _ in range(n)]


ROLE_IDS = {"system": 259, "user": 260, "assistant": 261}
END_ID = 262


def _random_chats(n, seed):
    """Chats of 1-3 turns with random roles and short random contents."""
    rng = random.Random(seed)
    texts = _random_documents(3 * n, seed + 100)
    return [
        tuple((rng.choice(list(ROLE_IDS)), texts[3 * i + j][: T // 2]) for j in range(rng.randint(1, 3)))
        for i in range(n)
    ]


def _reference_ids(doc):
    """(ids, trained) of a document, written out by hand: bos text eos, or
    bos (role content end)... eos with only assistant contents and their end trained."""
    if isinstance(doc, str):
        body = list(doc.encode("utf-8"))
        return [TOK.bos_id, *body, TOK.eos_id], [0] + [1] * (len(body) + 1)
    ids, trained = [TOK.bos_id], [0]
    for role, content in doc:
        body, answer = list(content.encode("utf-8")), int(role == "assistant")
        ids += [ROLE_IDS[role], *body, END_ID]
        trained += [0] + [answer] * (len(body) + 1)
    return ids + [TOK.eos_id], trained + [0]


def _reference_chunks(docs):
    """Each document's (input, target, loss mask) triples, cut into chunks of at most T."""
    chunks = []
    for doc in docs:
        ids, trained = _reference_ids(doc)
        triples = list(zip(ids[:-1], ids[1:], trained[1:]))
        chunks += [triples[i : i + T] for i in range(0, len(triples), T)]
    return chunks


def _reference_row(segments, *, positions_restart):
    """The batch features of one row holding `segments` (lists of triples) in order."""
    pairs = [p for s in segments for p in s]
    pad = T - len(pairs)
    seg_ids = [i + 1 for i, s in enumerate(segments) for _ in s] if positions_restart else [1] * len(pairs)
    pos = [j for s in segments for j in range(len(s))] if positions_restart else list(range(len(pairs)))
    return {
        "input_ids": [a for a, _, _ in pairs] + [TOK.pad_id] * pad,
        "targets": [b for _, b, _ in pairs] + [TOK.pad_id] * pad,
        "loss_mask": [m for _, _, m in pairs] + [0] * pad,
        "segment_ids": seg_ids + [0] * pad,
        "positions": pos + (list(range(len(pairs), T)) if not positions_restart else [0] * pad),
    }


def _reference_first_fit(docs, num_bins):
    """Naive first-fit: a chunk goes to the first bin with room; all bins are emitted when none has."""
    rows, bins = [], []
    for chunk in _reference_chunks(docs):
        for b in bins:
            if sum(map(len, b)) + len(chunk) <= T:
                b.append(chunk)
                break
        else:
            if len(bins) == num_bins:
                rows, bins = rows + bins, []
            bins.append([chunk])
    return [_reference_row(b, positions_restart=True) for b in rows + bins]


def _reference_concat_split(docs):
    """Naive concat-then-split of all pairs into rows of T."""
    pairs = [p for chunk in _reference_chunks(docs) for p in chunk]
    return [_reference_row([pairs[i : i + T]], positions_restart=False) for i in range(0, len(pairs), T)]


def _packed_rows(docs, mask_documents, num_bins=4):
    ds = pack_documents(
        grain.MapDataset.source(docs).to_iter_dataset(),
        tokenizer=TOK,
        seq_len=T,
        mask_documents=mask_documents,
        num_bins=num_bins,
    )
    rows = list(ds)
    for row in rows:
        assert all(v.dtype == np.int32 and v.shape == (T,) for v in row.values())
    return [{k: v.tolist() for k, v in row.items()} for row in rows]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_document_masked_packing_equals_naive_first_fit_reference(seed):
    docs = _random_documents(40, seed)
    assert _packed_rows(docs, mask_documents=True) == _reference_first_fit(docs, num_bins=4)


@pytest.mark.parametrize("seed", [0, 1])
def test_pretraining_packing_equals_naive_concat_then_split_reference(seed):
    docs = _random_documents(40, seed)
    assert _packed_rows(docs, mask_documents=False) == _reference_concat_split(docs)


@pytest.mark.parametrize("mask_documents", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_packing_carries_the_loss_mask_of_chats_and_texts_exactly(mask_documents, seed):
    docs = _random_documents(20, seed) + _random_chats(20, seed)
    random.Random(seed).shuffle(docs)
    want = _reference_first_fit(docs, num_bins=4) if mask_documents else _reference_concat_split(docs)
    got = _packed_rows(docs, mask_documents=mask_documents)
    assert got == want
    # real (unpadded) targets outside the loss occur, so the mask is really exercised
    assert any(m == 0 and seg > 0 for row in got for m, seg in zip(row["loss_mask"], row["segment_ids"]))


def test_document_masked_batches_have_per_document_segments_positions_and_targets():
    cfg = DataConfig(mask_documents=True, max_document_chars=15, seed=3)  # <= 61 pairs: never chunked
    it = build_train_iterator(cfg, seq_len=64, global_batch=8)
    for _ in range(3):
        batch = next(it)
        assert batch["input_ids"].shape == (8, 64)
        for r in range(8):
            seg, pos = batch["segment_ids"][r], batch["positions"][r]
            ids, tgt, mask = batch["input_ids"][r], batch["targets"][r], batch["loss_mask"][r]
            np.testing.assert_array_equal(mask, seg > 0)
            assert (ids[seg == 0] == TOK.pad_id).all()
            real = seg[seg > 0]
            assert (np.diff(real) >= 0).all() and (np.diff(real) <= 1).all() and real[0] == 1
            assert (seg[len(real) :] == 0).all()  # padding only at the end
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
            for s in starts:
                if seg[s] > 0:
                    end = s + np.count_nonzero(seg == seg[s])
                    np.testing.assert_array_equal(pos[s:end], np.arange(end - s))
                    assert ids[s] == TOK.bos_id
                    np.testing.assert_array_equal(tgt[s : end - 1], ids[s + 1 : end])
                    assert tgt[end - 1] == TOK.eos_id


def test_pretraining_batches_have_positions_0_to_T_one_segment_and_next_token_targets():
    """Chunks in document order (no shuffle window): a row's next input is its target except
    where a document ends (a shuffled chunk may also follow a chunk of another document)."""
    it = build_train_iterator(
        DataConfig(mask_documents=False, max_document_chars=40, shuffle_window=0), seq_len=32, global_batch=4
    )
    batch = next(it)
    np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(32), (4, 32)))
    assert (batch["segment_ids"] == 1).all() and (batch["loss_mask"] == 1).all()
    targets, following = batch["targets"][:, :-1], batch["input_ids"][:, 1:]
    new_document = following == TOK.bos_id
    assert new_document.any()
    np.testing.assert_array_equal(targets[~new_document], following[~new_document])
    assert (targets[new_document] == TOK.eos_id).all()
