"""Fill-in-the-middle (FIM): plain documents made into infilling examples, before packing.

Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the Middle"); the
DeepSeek-V3 report (section 4.1) applies PSM to 10% of its pre-training documents. A plain
document x of n characters is picked with probability `rate`; two character offsets drawn
uniformly from {0, ..., n} and sorted, i <= j, cut it into

    prefix = x[:i]    middle = x[i:j]    suffix = x[j:]

which are written in one of two layouts (each part encoded as plain text on its own):

    PSM  <bos> <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <eos>
    SPM  <bos> <|fim_begin|> <|fim_hole|> suffix <|fim_end|> prefix middle <eos>

SPM is the variant of the paper's appendix that uses PSM's tokens, so both train together;
a picked document is written in SPM with probability `spm_share`. As in a plain document every
token after <bos> is trained on. Documents not picked, and structured (chat) ones, pass as
they are. The markers are the tokenizer's named specials fim_begin / fim_hole / fim_end
(`data.special_tokens` renames their strings); text never encodes to them.

The draws of a document come from grain's `random_map`: a Philox generator keyed by the
seed, at the document's index in its source's stream. The index is part of the iterator
state, so a resumed pipeline makes the same choices for the same documents.
"""

from __future__ import annotations

import enum

import grain
import numpy as np

from frontier_jax.data.template import Document, Piece
from frontier_jax.data.tokenizer import BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE


class FimLayout(enum.StrEnum):
    """The order of the parts of a FIM example (see the module docstring)."""

    psm = "psm"  # prefix, suffix, middle
    spm = "spm"  # suffix, prefix, middle


def fim_pieces(prefix: str, middle: str, suffix: str, layout: FimLayout) -> list[Piece]:
    """The pieces of one FIM example, every token after <bos> trained on."""
    begin, hole, end = Piece(special=FIM_BEGIN), Piece(special=FIM_HOLE), Piece(special=FIM_END)
    if layout == FimLayout.psm:
        body = [begin, Piece(prefix), hole, Piece(suffix), end, Piece(middle)]
    else:
        body = [begin, hole, Piece(suffix), end, Piece(prefix), Piece(middle)]
    return [Piece(special=BOS, train=False), *body, Piece(special=EOS)]


class FimTransform(grain.transforms.RandomMap):
    """Document -> the FIM pieces of it with probability `rate`, else the document itself."""

    def __init__(self, rate: float, spm_share: float):
        self.rate = rate
        self.spm_share = spm_share

    def random_map(self, element: Document, rng: np.random.Generator) -> Document:
        if not isinstance(element, str) or rng.random() >= self.rate:
            return element
        i, j = sorted(rng.integers(0, len(element) + 1, size=2))
        layout = FimLayout.spm if rng.random() < self.spm_share else FimLayout.psm
        return fim_pieces(element[:i], element[i:j], element[j:], layout)


def fim_documents(
    documents: grain.IterDataset, *, rate: float, spm_share: float, seed: int
) -> grain.IterDataset:
    """`documents` with `FimTransform` applied; as they are (same iterator state) when rate is 0."""
    if rate == 0:
        return documents
    return documents.random_map(FimTransform(rate, spm_share), seed=seed)
