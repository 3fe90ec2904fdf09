"""Tokenizers: the built-in byte-level one and Hugging Face tokenizer.json files.

Both are `tokenizers.Tokenizer` objects behind one small wrapper. Special-token
strings that occur inside document text (e.g. a literal "<eos>") are encoded as
plain text, so data can never inject control tokens.
"""

from __future__ import annotations

import os

import tokenizers

BYTE_TOKENIZER = "byte"
_BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<|startoftext|>",
              "<|endoftext|>")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<｜▁pad▁｜>", "<|finetune_right_pad_id|>")


class Tokenizer:
    """Text <-> token ids, with the ids of the bos, eos and pad tokens."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, *, bos_id: int, eos_id: int, pad_id: int):
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`, without bos/eos or any template tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Returns the text of `ids`; special tokens are written out as their names."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    # `encode_special_tokens` is not pickled by `tokenizers`: rebuild from JSON.
    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "ids": (self.bos_id, self.eos_id, self.pad_id)}

    def __setstate__(self, state: dict) -> None:
        bos_id, eos_id, pad_id = state["ids"]
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]),
                      bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def _byte_to_char() -> dict[int, str]:
    """Maps each byte to the printable character `tokenizers`' ByteLevel uses for it.

    Printable Latin-1 bytes stand for themselves; the others are shifted, in
    order, to code points 256, 257, ...
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def byte_tokenizer() -> Tokenizer:
    """The built-in tokenizer: id b is byte b (0..255), then <pad>=256, <bos>=257, <eos>=258."""
    vocab = {char: b for b, char in _byte_to_char().items()}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in _BYTE_SPECIALS])
    pad_id, bos_id, eos_id = (tok.token_to_id(s) for s in _BYTE_SPECIALS)
    return Tokenizer(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def _find_token(tok: tokenizers.Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def load_tokenizer(spec: str) -> Tokenizer:
    """Returns the tokenizer named by `data.tokenizer`: "byte" or a tokenizer.json path.

    bos/eos are looked up among common token names; pad falls back to eos (pad
    positions are always masked out of the loss).
    """
    if spec == BYTE_TOKENIZER:
        return byte_tokenizer()
    if not os.path.isfile(spec):
        raise FileNotFoundError(
            f"data.tokenizer={spec!r}: no such file. Give a path to a Hugging Face "
            f'tokenizer.json or use "{BYTE_TOKENIZER}" for the built-in byte tokenizer.'
        )
    tok = tokenizers.Tokenizer.from_file(spec)
    bos_id, eos_id = _find_token(tok, _BOS_NAMES), _find_token(tok, _EOS_NAMES)
    if bos_id is None or eos_id is None:
        missing = "bos" if bos_id is None else "eos"
        names = _BOS_NAMES if bos_id is None else _EOS_NAMES
        raise ValueError(
            f"data.tokenizer={spec!r} has no {missing} token: none of {list(names)} is in "
            "its vocabulary. Add one as a special token to the tokenizer.json."
        )
    pad_id = _find_token(tok, _PAD_NAMES)
    return Tokenizer(tok, bos_id=bos_id, eos_id=eos_id, pad_id=eos_id if pad_id is None else pad_id)
