"""Rendering a document into token ids with a per-token training flag (the chat template).

A document is rendered as a list of `Piece`s, each a text (encoded as plain text: special
strings inside it stay text) or one named special token, and each with whether its tokens
are trained on, i.e. predicted with loss:

  plain text  <bos> text <eos>                                  trained: text, <eos>
  messages    <bos> (<|role|> content <|end|>)... <eos>         trained: the content of each
                                                                assistant turn and its <|end|>
  pieces      as given (e.g. the FIM transform's <|fim_begin|> prefix <|fim_hole|> suffix
              <|fim_end|> middle)
  rendered    a prepared shard's document (`records.Rendered`), already rendered

`render` returns ids int32 [n] and train bool [n]; the packer makes the pairs
(ids[i], ids[i + 1]) with loss_mask[i] = train[i + 1], so the first token is never a target.
A chat therefore ends its answer with <|end|>, the stop token of generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from frontier_jax.data.records import Message, Rendered
from frontier_jax.data.tokenizer import ASSISTANT, BOS, END, EOS, Tokenizer


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of a rendered document: `text`, or the special token named `special`."""

    text: str = ""
    special: str | None = None
    train: bool = True


Document = str | tuple[Message, ...] | list[Piece] | Rendered


def text_pieces(text: str) -> list[Piece]:
    """A plain document: every token after <bos> is trained on."""
    return [Piece(special=BOS, train=False), Piece(text), Piece(special=EOS)]


def chat_pieces(messages: Sequence[Message]) -> list[Piece]:
    """The turns of a chat behind their role tags; only assistant turns are trained on."""
    pieces = [Piece(special=BOS, train=False)]
    for role, content in messages:
        answer = role == ASSISTANT
        pieces += [
            Piece(special=role, train=False),
            Piece(content, train=answer),
            Piece(special=END, train=answer),
        ]
    return pieces + [Piece(special=EOS, train=False)]


def document_pieces(document: Document) -> list[Piece]:
    """The pieces of a plain text, a tuple of (role, content) messages, or a list of pieces."""
    if isinstance(document, str):
        return text_pieces(document)
    if isinstance(document, list):
        return document
    return chat_pieces(document)


def render(tokenizer: Tokenizer, pieces: Sequence[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [n], train bool [n]) of the concatenated pieces."""
    ids: list[int] = []
    train: list[bool] = []
    for piece in pieces:
        piece_ids = [tokenizer.special_id(piece.special)] if piece.special else tokenizer.encode(piece.text)
        ids += piece_ids
        train += [piece.train] * len(piece_ids)
    return np.asarray(ids, np.int32), np.asarray(train, bool)


def render_document(tokenizer: Tokenizer, document: Document) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [n], train bool [n]) of any document; a `Rendered` one as it is."""
    if isinstance(document, Rendered):
        return document.ids.astype(np.int32), document.train.astype(bool)
    return render(tokenizer, document_pieces(document))
