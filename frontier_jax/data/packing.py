"""Tokenize documents and pack them into rows of `seq_len` (input, target) pairs.

A document renders (`template.py`) to n ids with a training flag each, e.g. a plain
text of m tokens to bos + tokens + eos = m + 2 ids; it yields the n - 1 pairs
(ids[i], ids[i + 1]) with loss_mask[i] = train[i + 1], so every target is the true
next token of the same document and eos is predicted but never fed. Documents of
more than `seq_len` pairs are cut into chunks of `seq_len` pairs. The loss mask
travels with its pairs through both packers; padding gets 0.

With `shuffle_window` W > 0 the chunks go through grain's window shuffle before packing:
each run of W consecutive chunks is emitted in a seeded random order (a new permutation per
window), so a long document's chunks land in rows far apart and each row and batch holds
chunks of many documents.  Its state is the position of the window's start plus the chunks
emitted from it (a restore reads the window again), so the stream stays resumable.

Packing, by `mask_documents`:
  False (pre-training): grain's ConcatThenSplit concatenates the pair stream and
    cuts it every `seq_len` pairs: no padding, a document may continue on the
    next row; segment_ids is 1 on every real token, positions are 0..T-1.
  True (SFT): grain's FirstFitPack places whole chunks in rows without splitting
    them; each chunk gets its own segment id (1, 2, ...) and positions restart
    at 0; the rest of the row is padding.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from frontier_jax.data.template import ChatTemplate, Document, render_document
from frontier_jax.data.tokenizer import Tokenizer

_LENGTH_KEYS = ("inputs", "targets", "loss_mask")


class TokenizeDocument(grain.experimental.FlatMapTransform):
    """Document -> [{"inputs", "targets", "loss_mask": int32[n]}], chunks of n <= max_len pairs."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, template: ChatTemplate | None = None):
        self._tokenizer = tokenizer
        self._max_len = max_len
        self._template = template

    def flat_map(self, document: Document) -> list[dict[str, np.ndarray]]:
        ids, train = render_document(self._tokenizer, document, self._template)
        pairs = {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": train[1:].astype(np.int32)}
        return [
            {k: v[i : i + self._max_len] for k, v in pairs.items()}
            for i in range(0, len(ids) - 1, self._max_len)
        ]


class _JsonStateIterator(grain.DatasetIterator):
    """Passes a ConcatThenSplit iterator through, restoring states that went through JSON.

    Its state holds `remainder_slices` tuples that it compares with a tuple;
    JSON turns them into lists, which would corrupt the restored position.
    """

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


class _JsonStateDataset(grain.IterDataset):
    """See `_JsonStateIterator`."""

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonStateIterator(self._parent.__iter__())


def _row(packed: dict[str, np.ndarray], *, mask_documents: bool, pad_id: int) -> dict[str, np.ndarray]:
    """The batch features of one packed row; all int32 [T]."""
    segments = packed["inputs_segment_ids"]
    real = segments > 0
    if mask_documents:
        segment_ids, positions = segments, packed["inputs_positions"]
    else:
        segment_ids, positions = real, np.arange(len(segments))
    return {
        "input_ids": np.where(real, packed["inputs"], pad_id).astype(np.int32),
        "targets": np.where(real, packed["targets"], pad_id).astype(np.int32),
        "loss_mask": (real & (packed["loss_mask"] > 0)).astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": positions.astype(np.int32),
    }


def padding_rows(n: int, seq_len: int, *, pad_id: int) -> dict[str, np.ndarray]:
    """n rows of padding with the features of `_row`: pad_id tokens, every mask and id 0."""
    zeros = np.zeros((n, seq_len), np.int32)
    pads = np.full((n, seq_len), pad_id, np.int32)
    return {
        "input_ids": pads,
        "targets": pads.copy(),
        "loss_mask": zeros,
        "segment_ids": zeros.copy(),
        "positions": zeros.copy(),
    }


def pack_documents(
    documents: grain.IterDataset,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    mask_documents: bool,
    num_bins: int,
    shuffle_window: int = 0,
    seed: int = 0,
    template: ChatTemplate | None = None,
) -> grain.IterDataset:
    """IterDataset[Document] -> IterDataset of rows {input_ids, targets, loss_mask, segment_ids, positions}.

    `num_bins`: rows filled at once by the SFT packer (more bins, less padding).
    `shuffle_window`: chunks shuffled together before packing (0: in document order), with `seed`.
    `template`: the tokenizer's chat template, which renders chats (None: the project's format).
    """
    chunks = grain.experimental.FlatMapIterDataset(documents, TokenizeDocument(tokenizer, seq_len, template))
    if shuffle_window:
        chunks = grain.experimental.WindowShuffleIterDataset(chunks, window_size=shuffle_window, seed=seed)
    length_struct = {key: seq_len for key in _LENGTH_KEYS}
    if mask_documents:
        packed = grain.experimental.FirstFitPackIterDataset(
            chunks, length_struct=length_struct, num_packing_bins=num_bins, shuffle_bins=False
        )
    else:
        packed = _JsonStateDataset(
            grain.experimental.ConcatThenSplitIterDataset(chunks, length_struct=length_struct)
        )
    return packed.map(functools.partial(_row, mask_documents=mask_documents, pad_id=tokenizer.pad_id))
