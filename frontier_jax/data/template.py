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
A chat therefore ends its answer with <|end|>, the stop token of generation.  The generation
prompt (`prompt_pieces`) is the turns followed by <|assistant|>, without an end token.

Hugging Face chat templates (`ChatTemplate`, a tokenizer_config.json's `chat_template`) replace
this format where a tokenizer has one; `render_chat` and `render_prompt` take either, so
supervised fine-tuning, rollouts and serving render chats alike.  A template renders with Jinja
as transformers renders it (trim_blocks, lstrip_blocks, `raise_exception`, `strftime_now`, a
`tojson` that keeps non-ASCII characters), then the text is cut only at the template's own
special tokens: before rendering, every special-token string inside a message is replaced by a
private-use character (U+F0002 ..) and restored as plain text after the cut, so a message never
injects a control token.  The loss mask: the text of the template's `{% generation %}` blocks
is trained on; a template without them trains each assistant message's text past the
generation prompt, the characters between render(messages[:i], add_generation_prompt=True) and
render(messages[:i + 1]), which must both be prefixes of the whole rendering (prefix-stable; an
error otherwise).  A token is trained on when a character it stands for is.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from frontier_jax.data.records import Message, Rendered
from frontier_jax.data.tokenizer import ASSISTANT, BOS, BYTE_TOKENIZER, END, EOS, Tokenizer


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


def prompt_pieces(messages: Sequence[Message]) -> list[Piece]:
    """The generation prompt: the turns of `messages`, then the assistant tag (no end token)."""
    return chat_pieces(messages)[:-1] + [Piece(special=ASSISTANT, train=False)]


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


def render_document(
    tokenizer: Tokenizer, document: Document, template: ChatTemplate | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [n], train bool [n]) of any document; a `Rendered` one as it is; a chat (a
    tuple of messages) by `template` where there is one (`render_chat`)."""
    if isinstance(document, Rendered):
        return document.ids.astype(np.int32), document.train.astype(bool)
    if isinstance(document, tuple) and template is not None:
        return template.render(tokenizer, document)
    return render(tokenizer, document_pieces(document))


# ---------------------------------------------------------------------- Jinja chat templates
_PRIVATE = 0xF0000  # Supplementary Private Use Area-A: the markers and escapes below
GENERATION_START, GENERATION_END = chr(_PRIVATE), chr(_PRIVATE + 1)
_FIRST_ESCAPE = _PRIVATE + 2
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
ChatMessage = Message | Mapping  # (role, content) or {"role": .., "content": .., ...}


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %} .. {% endgeneration %}`: the block's text between two marker characters."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        return GENERATION_START + caller() + GENERATION_END


def _raise(message: str):
    raise ValueError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template (module docstring): its source and the variables it reads besides
    `messages` and `add_generation_prompt` (bos_token, eos_token, ...)."""

    source: str
    variables: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> ChatTemplate | None:
        """The template of a Hugging Face tokenizer directory or its tokenizer_config.json
        (`chat_template`: a string, or the entry named "default" of a list; else a
        chat_template.jinja beside it) with its special-token strings as variables; None when
        it has none (the project's own format applies)."""
        path = Path(path)
        config_file = path / "tokenizer_config.json" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"chat template: no such file or directory {path}")
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        jinja_file = config_file.parent / "chat_template.jinja"
        if source is None and jinja_file.is_file():
            source = jinja_file.read_text()
        if source is None:
            return None
        variables = {
            key: value if isinstance(value, str) else value["content"]
            for key, value in config.items()
            if key.endswith("_token")
            and (isinstance(value, str) or isinstance(value, dict) and "content" in value)
        }
        return cls(source, variables)

    @classmethod
    def of_tokenizer(cls, spec: str) -> ChatTemplate | None:
        """The template beside a `data.tokenizer` (its tokenizer.json's directory: `load`), or
        None for the byte tokenizer and a tokenizer without one."""
        if spec == BYTE_TOKENIZER:
            return None
        return cls.load(Path(spec).parent)

    def __getstate__(self) -> dict:  # (to grain workers: the compiled template stays behind)
        return {"source": self.source, "variables": dict(self.variables)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @functools.cached_property
    def _compiled(self) -> jinja2.Template:
        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"chat template: line {err.lineno}: {err.message}") from err

    @property
    def marks_generation(self) -> bool:
        """Whether the template marks its trained text with `{% generation %}` blocks."""
        return bool(_GENERATION_TAG.search(self.source))

    def text(self, messages: Sequence[Mapping], add_generation_prompt: bool = False, **kwargs) -> str:
        """The rendered text, generation markers included."""
        return self._compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **{**self.variables, **kwargs},
        )

    def render(
        self,
        tokenizer: Tokenizer,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = False,
        **kwargs,
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids int32 [n], train bool [n]) of the chat (module docstring); kwargs are more
        template variables (e.g. tools)."""
        escapes = {s: chr(_FIRST_ESCAPE + i) for i, s in enumerate(sorted(tokenizer.special_strings()))}
        messages = [_escaped_message(m, escapes, i) for i, m in enumerate(messages)]
        text, trained = _unmark(self.text(messages, add_generation_prompt, **kwargs))
        if not self.marks_generation and not add_generation_prompt:
            trained = self._prefix_diff(messages, text, kwargs)
        return _tokenize(tokenizer, text, trained, {c: s for s, c in escapes.items()})

    def _prefix_diff(self, messages: list[dict], whole: str, kwargs: dict) -> np.ndarray:
        """Each assistant message's text past its generation prompt, trained (module docstring)."""
        trained = np.zeros(len(whole), bool)
        for i, message in enumerate(messages):
            if message.get("role") != ASSISTANT:
                continue
            before = self.text(messages[:i], True, **kwargs)
            through = self.text(messages[: i + 1], False, **kwargs)
            if not (through.startswith(before) and whole.startswith(through)):
                raise ValueError(
                    f"chat template: rendering is not prefix-stable at message {i} (the chat rendered up to "
                    "it is not a prefix of the whole chat): mark the trained text with {% generation %} blocks"
                )
            trained[len(before) : len(through)] = True
        return trained


def _escaped_message(message: ChatMessage, escapes: dict[str, str], index: int) -> dict:
    """`message` as a dict whose strings have every special-token string replaced by its escape."""
    if not isinstance(message, Mapping):
        role, content = message
        message = {"role": role, "content": content}

    def escape(value):
        if isinstance(value, str):
            if any(_PRIVATE <= ord(c) < _FIRST_ESCAPE + len(escapes) for c in value):
                raise ValueError(
                    f"chat message {index} holds a character in U+{_PRIVATE:X}..U+{_FIRST_ESCAPE + len(escapes) - 1:X}, "
                    "which chat templates reserve for their markers: remove it"
                )
            for special, char in escapes.items():
                value = value.replace(special, char)
            return value
        if isinstance(value, Mapping):
            return {k: escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [escape(v) for v in value]
        return value

    return escape(message)


def _unmark(marked: str) -> tuple[str, np.ndarray]:
    """Rendered text with generation markers -> (the text, trained bool per character)."""
    parts = re.split(f"([{GENERATION_START}{GENERATION_END}])", marked)
    text, trained, inside = [], [], False
    for part in parts:
        if part in (GENERATION_START, GENERATION_END):
            inside = part == GENERATION_START
        else:
            text.append(part)
            trained += [inside] * len(part)
    return "".join(text), np.asarray(trained, bool)


def _tokenize(
    tokenizer: Tokenizer, text: str, trained: np.ndarray, unescape: dict[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """The escaped rendered `text` cut at its special tokens, the rest restored and encoded as
    plain text -> (ids, train: a character of the token is trained)."""
    ids, train, position = [], [], 0
    for start, end, token in [*tokenizer.find_specials(text), (len(text), len(text), None)]:
        if start > position:
            restored, source = [], []
            for j, char in enumerate(text[position:start], position):
                original = unescape.get(char, char)
                restored.append(original)
                source += [j] * len(original)
            piece_trained = trained[np.asarray(source)]
            piece_ids, offsets = tokenizer.encode_with_offsets("".join(restored))
            ids += piece_ids
            train += [bool(piece_trained[a:b].any()) for a, b in offsets]
        if token is not None:
            ids.append(token)
            train.append(bool(trained[start:end].any()))
        position = end
    return np.asarray(ids, np.int32), np.asarray(train, bool)


def _as_tuples(messages: Sequence[ChatMessage]) -> list[Message]:
    return [(m["role"], m["content"]) if isinstance(m, Mapping) else tuple(m) for m in messages]


def render_chat(
    tokenizer: Tokenizer, messages: Sequence[ChatMessage], template: ChatTemplate | None = None, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """A whole chat -> (ids int32 [n], train bool [n]) by `template`, or the project's format
    (`chat_pieces`) when None."""
    if template is None:
        return render(tokenizer, chat_pieces(_as_tuples(messages)))
    return template.render(tokenizer, messages, **kwargs)


def render_prompt(
    tokenizer: Tokenizer, messages: Sequence[ChatMessage], template: ChatTemplate | None = None, **kwargs
) -> list[int]:
    """The generation prompt of `messages` (the chat, then the assistant's tag; no end token)
    by `template` (add_generation_prompt=True), or the project's format (`prompt_pieces`)."""
    if template is None:
        return render(tokenizer, prompt_pieces(_as_tuples(messages)))[0].tolist()
    return template.render(tokenizer, messages, add_generation_prompt=True, **kwargs)[0].tolist()
