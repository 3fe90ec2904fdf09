"""Perplexity, mean next-token cross-entropy and bits per byte of held-out documents.

Each document renders as in training (`data.template`: <bos> text <eos>, chat turns with only
the assistant's content scored); the scored pairs are exactly training's loss-masked targets.
Over all N scored tokens of all documents, with B the UTF-8 bytes of the scored text:
    CE  = -(1/N) sum_scored log p(x_{i+1} | x_<=i)      (nats per token)
    PPL = exp(CE)
    BPB = -(sum_text log p) / (B ln 2)                  (bits per byte; tokenizer-independent)
where sum_text leaves out the scored targets that are special tokens (<eos>, a chat turn's
<|end|>): they have no bytes of text.  This is lm-eval's `bits_per_byte` (the log-likelihood of
a document's text tokens after the prefix token, over the text's UTF-8 bytes), so the figures
compare with lm-eval's; `text_nll` is its numerator.
Documents longer than the window are scored with `eval.stride` sliding windows
(`windows.sliding_windows`): every token counted once, padding and other documents never.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from frontier_jax.data.template import Document, document_pieces, render
from frontier_jax.data.tokenizer import Tokenizer
from frontier_jax.eval.scorer import Scorer
from frontier_jax.eval.windows import sliding_windows


def scored_sequence(
    tokenizer: Tokenizer, document: Document
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(ids [n + 1], scored flag per pair [n], text flag per pair [n]: scored with a target from
    a text piece, not a special token; UTF-8 bytes of the scored text) of a document."""
    pieces = document_pieces(document)
    ids, train = render(tokenizer, pieces)
    text_pieces = [dataclasses.replace(p, train=p.train and not p.special) for p in pieces]
    _, text = render(tokenizer, text_pieces)
    n_bytes = sum(len(p.text.encode("utf-8")) for p in text_pieces if p.train)
    return ids, train[1:].astype(np.int32), text[1:].astype(np.int32), n_bytes


def summarize(nll: float, tokens: int, text_nll: float, n_bytes: int) -> dict:
    """The figures of a total negative log-likelihood (nats) over `tokens` scored tokens, and of
    `text_nll`, that of their text tokens, over `n_bytes` bytes."""
    ce = nll / tokens
    return {
        "ce": ce,
        "perplexity": math.exp(ce),
        "bits_per_byte": text_nll / (n_bytes * math.log(2)) if n_bytes else float("nan"),
        "tokens": tokens,
        "bytes": n_bytes,
        "nll": nll,
        "text_nll": text_nll,
    }


def evaluate_documents(
    scorer: Scorer, tokenizer: Tokenizer, documents: list[Document], *, stride: int, desc: str = "eval"
) -> dict:
    """CE / perplexity / bits per byte of `documents` (module docstring), summed in float64."""
    windows, text_windows, n_bytes = [], [], 0
    for k, document in enumerate(documents):
        ids, scored, text, size = scored_sequence(tokenizer, document)
        windows += sliding_windows(ids, scored, context=scorer.context, stride=stride, sequence=k)
        text_windows += sliding_windows(ids, text, context=scorer.context, stride=stride, sequence=k)
        n_bytes += size
    nll, text_nll, tokens = 0.0, 0.0, 0
    scores = scorer.score(windows, desc=desc)
    for window, text_window, (logprob, _) in zip(windows, text_windows, scores):
        mask = window.scored.astype(bool)
        nll -= float(np.sum(logprob[mask], dtype=np.float64))
        text_nll -= float(np.sum(logprob[text_window.scored.astype(bool)], dtype=np.float64))
        tokens += int(mask.sum())
    if not tokens:
        raise ValueError("no scored token in the evaluation documents (all empty?)")
    figures = summarize(nll, tokens, text_nll, n_bytes)
    return {**figures, "documents": len(documents), "windows": len(windows)}
