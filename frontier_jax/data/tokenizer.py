"""Tokenizers: the built-in byte-level one and Hugging Face tokenizer.json files.

Both are `tokenizers.Tokenizer` objects behind one small wrapper, with named special tokens:

  name        byte tokenizer id   tokenizer.json: the first added token found among
  pad         256 <pad>           <pad>, [PAD], <|pad|>, ...   (else eos)
  bos         257 <bos>           <bos>, <s>, <|begin_of_text|>, <｜begin▁of▁sentence｜>, ...
  eos         258 <eos>           <eos>, </s>, <|end_of_text|>, <｜end▁of▁sentence｜>, ...
  system      259 <|system|>      <|system|>
  user        260 <|user|>        <|user|>, <｜User｜>
  assistant   261 <|assistant|>   <|assistant|>, <｜Assistant｜>
  end         262 <|end|>         <|end|>, <|im_end|>, <|eot_id|>
  fim_begin   263 <|fim_begin|>   <|fim_begin|>, <｜fim▁begin｜>, <|fim_prefix|>, <fim_prefix>
  fim_hole    264 <|fim_hole|>    <|fim_hole|>, <｜fim▁hole｜>, <|fim_suffix|>, <fim_suffix>
  fim_end     265 <|fim_end|>     <|fim_end|>, <｜fim▁end｜>, <|fim_middle|>, <fim_middle>

(`data.special_tokens` replaces the token string of a name in either tokenizer.)  Only
*added* tokens of a tokenizer.json count, looked up by their string.  Special-token strings
that occur inside document text (e.g. a literal "<|fim_begin|>") are encoded as plain text,
so data can never inject control tokens: a special id only comes from `special_id(name)`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Mapping

import tokenizers

log = logging.getLogger(__name__)

BYTE_TOKENIZER = "byte"
BOS, EOS, PAD = "bos", "eos", "pad"
SYSTEM, USER, ASSISTANT, END = "system", "user", "assistant", "end"
FIM_BEGIN, FIM_HOLE, FIM_END = "fim_begin", "fim_hole", "fim_end"
CHAT_SPECIALS = (SYSTEM, USER, ASSISTANT, END)
FIM_SPECIALS = (FIM_BEGIN, FIM_HOLE, FIM_END)

# Candidate strings per name, the byte tokenizer's own first; the byte tokenizer's ids follow
# this order after the 256 bytes.
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    PAD: ("<pad>", "[PAD]", "<|pad|>", "<｜▁pad▁｜>", "<|finetune_right_pad_id|>"),
    BOS: ("<bos>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<|startoftext|>", "<|endoftext|>"),
    EOS: ("<eos>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|endoftext|>"),
    SYSTEM: ("<|system|>",),
    USER: ("<|user|>", "<｜User｜>"),
    ASSISTANT: ("<|assistant|>", "<｜Assistant｜>"),
    END: ("<|end|>", "<|im_end|>", "<|eot_id|>"),
    FIM_BEGIN: ("<|fim_begin|>", "<｜fim▁begin｜>", "<|fim_prefix|>", "<fim_prefix>"),
    FIM_HOLE: ("<|fim_hole|>", "<｜fim▁hole｜>", "<|fim_suffix|>", "<fim_suffix>"),
    FIM_END: ("<|fim_end|>", "<｜fim▁end｜>", "<|fim_middle|>", "<fim_middle>"),
}


class Tokenizer:
    """Text <-> token ids, with the ids of the named special tokens (`SPECIAL_TOKENS`)."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, special_ids: Mapping[str, int], origin: str):
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True
        self.special_ids = dict(special_ids)
        self.origin = origin
        self.bos_id = special_ids[BOS]
        self.eos_id = special_ids[EOS]
        self.pad_id = special_ids[PAD]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special_id(self, name: str) -> int:
        """The id of the special token `name` (a key of `SPECIAL_TOKENS`)."""
        if name not in self.special_ids:
            raise ValueError(
                f"data.tokenizer={self.origin!r} has no {name!r} special token: none of "
                f"{list(SPECIAL_TOKENS[name])} is an added token. Add one to the tokenizer.json or "
                f"name the token to use in data.special_tokens.{name}."
            )
        return self.special_ids[name]

    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`, without bos/eos or any template tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode` with the character span (start, end) of `text` that each id stands for."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def special_strings(self) -> dict[str, int]:
        """The added tokens marked special, {string: id}: the control tokens that `encode`
        writes as plain text when they occur in a document."""
        return {
            token.content: i for i, token in self._tok.get_added_tokens_decoder().items() if token.special
        }

    def find_specials(self, text: str) -> list[tuple[int, int, int]]:
        """Where the tokenizer's own matching of added tokens (its strip rules included) finds
        special tokens in `text`: (start, end, id) of each, in order.  For text whose special
        strings are all control tokens (a rendered chat template), never for documents."""
        specials = set(self.special_strings().values())
        self._tok.encode_special_tokens = False
        try:
            encoding = self._tok.encode(text, add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = True
        return [(start, end, i) for i, (start, end) in zip(encoding.ids, encoding.offsets) if i in specials]

    def decode(self, ids: list[int]) -> str:
        """Returns the text of `ids`; special tokens are written out as their names."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        """The Hugging Face tokenizer JSON: vocabulary, merges, normalisation and added tokens."""
        return self._tok.to_str()

    # `encode_special_tokens` is not pickled by `tokenizers`: rebuild from JSON.
    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "special_ids": self.special_ids, "origin": self.origin}

    def __setstate__(self, state: dict) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), state["special_ids"], state["origin"])


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


def _candidates(overrides: Mapping[str, str] | None) -> dict[str, tuple[str, ...]]:
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(SPECIAL_TOKENS))
    if unknown:
        raise ValueError(
            f"data.special_tokens.{unknown[0]} is not a special token name: use one of "
            f"{list(SPECIAL_TOKENS)}."
        )
    return {
        name: (overrides[name],) if name in overrides else strings for name, strings in SPECIAL_TOKENS.items()
    }


def byte_tokenizer(special_tokens: Mapping[str, str] | None = None) -> Tokenizer:
    """The built-in tokenizer: id b is byte b (0..255), then the `SPECIAL_TOKENS` in order
    (<pad>=256, <bos>=257, <eos>=258, <|system|>=259, ..., <|fim_end|>=265): 266 ids."""
    strings = [candidates[0] for candidates in _candidates(special_tokens).values()]
    vocab = {char: b for b, char in _byte_to_char().items()}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in strings])
    return Tokenizer(
        tok, {name: tok.token_to_id(s) for name, s in zip(SPECIAL_TOKENS, strings)}, BYTE_TOKENIZER
    )


def load_tokenizer(spec: str, special_tokens: Mapping[str, str] | None = None) -> Tokenizer:
    """Returns the tokenizer named by `data.tokenizer`: "byte" or a tokenizer.json path.

    Each special token is the first of its candidate strings (`SPECIAL_TOKENS`, or the one
    given in `special_tokens`) that is an added token; bos and eos are required, pad falls
    back to eos (pad positions are always masked out of the loss), the others are looked up
    when used (`Tokenizer.special_id`).
    """
    if spec == BYTE_TOKENIZER:
        return byte_tokenizer(special_tokens)
    if not os.path.isfile(spec):
        raise FileNotFoundError(
            f"data.tokenizer={spec!r}: no such file. Give a path to a Hugging Face "
            f'tokenizer.json or use "{BYTE_TOKENIZER}" for the built-in byte tokenizer.'
        )
    candidates = _candidates(special_tokens)
    try:
        tok = tokenizers.Tokenizer.from_file(spec)
    except Exception as err:  # tokenizers raises a bare Exception for any parse failure
        raise ValueError(
            f"data.tokenizer={spec!r} is not a valid Hugging Face tokenizer.json "
            f"({str(err).splitlines()[0]}): give the tokenizer.json file itself"
        ) from err
    added = {token.content: token_id for token_id, token in tok.get_added_tokens_decoder().items()}
    found = {
        name: next(added[s] for s in strings if s in added)
        for name, strings in candidates.items()
        if any(s in added for s in strings)
    }
    for required in (BOS, EOS):
        if required not in found:
            raise ValueError(
                f"data.tokenizer={spec!r} has no {required} token: none of {list(candidates[required])} "
                "is an added token. Add one as a special token to the tokenizer.json."
            )
    found.setdefault(PAD, found[EOS])
    return Tokenizer(tok, found, spec)


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What makes two tokenizers give the same ids: the sha256 of its canonical JSON (`to_str()`:
    vocabulary, merges, normalisation and added tokens, serialised by `tokenizers` itself, so the
    same content at another path or formatted otherwise hashes the same; the byte tokenizer's too)
    and the ids of its named special tokens.  `origin` and `vocab_size` are there to be named."""
    return {
        "origin": tokenizer.origin,
        "vocab_size": tokenizer.vocab_size,
        "special_ids": dict(sorted(tokenizer.special_ids.items())),
        "sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
    }


def check_tokenizer(
    recorded: Mapping[str, Any] | None, tokenizer: Tokenizer, what: str, fix: str, error: type = ValueError
) -> None:
    """Raises `error` when `tokenizer` is not the one whose `tokenizer_identity` is `recorded`,
    naming both: "<what> with another tokenizer (...) than this config's data.tokenizer=... (...):
    <fix>"; `what` says who recorded it, e.g. "data.sources[0] ('math', path=...) was prepared".
    recorded None (written before tokenizers were recorded): a warning, nothing checked."""
    if recorded is None:
        log.warning(
            "%s before tokenizers were recorded: data.tokenizer=%r is not checked against the one it used",
            what,
            tokenizer.origin,
        )
        return
    current = tokenizer_identity(tokenizer)
    if (recorded["sha256"], recorded["special_ids"]) == (current["sha256"], current["special_ids"]):
        return

    def described(identity: Mapping[str, Any]) -> str:
        return f"{identity['vocab_size']} ids, sha256 {identity['sha256'][:12]}..."

    raise error(
        f"{what} with another tokenizer (data.tokenizer={recorded['origin']!r}, {described(recorded)}) "
        f"than this config's data.tokenizer={current['origin']!r} ({described(current)}; "
        f"data.special_tokens count): {fix}"
    )


def run_tokenizer(run_config: Mapping[str, Any], what: str) -> Tokenizer:
    """The tokenizer of a saved run config (its data.tokenizer and data.special_tokens), refused
    (ValueError naming both hashes) when its content is not the one the config records
    (`tokenizer_identity` under "tokenizer"), e.g. tokenizer.json overwritten since training;
    `what` names the record, e.g. "checkpoint 8 in RUN/checkpoints was trained"."""
    data = run_config.get("data", {})
    tokenizer = load_tokenizer(data.get("tokenizer", BYTE_TOKENIZER), data.get("special_tokens") or None)
    check_tokenizer(
        run_config.get("tokenizer"),
        tokenizer,
        what,
        "the file changed since training; put back the tokenizer the run was trained with",
    )
    return tokenizer
