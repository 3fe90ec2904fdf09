"""Raw records: a document (text or messages), or why there is none, with where it came from.

A record of a `SourceConfig` is read from its fields by `source.format`:
  text             text_field: str (or UTF-8 bytes)                      -> Record.text
  prompt_response  prompt_field, response_field: str                     -> Record.messages
                   (("user", prompt), ("assistant", response))
  chat             messages_field: [{"role": r, "content": str}, ...],   -> Record.messages
                   r in ROLES
A field that is absent (or null) is MISSING_FIELD; a field of the wrong type, a message that
is not an object, or a role outside ROLES is WRONG_TYPE; a message (prompt, response) whose
content is blank is EMPTY_CONTENT; a chat without an assistant turn (nothing to train on) is
NO_ASSISTANT.  `Record.detail` names the field, e.g. "messages[2].role='bot'".
A record of a prepared shard (`prepared.py`) is a document already screened and rendered:
Record.rendered.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from frontier_jax.data.config import RecordFormat, SourceConfig

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_CONTENT = "empty_content"
NO_ASSISTANT = "no_assistant_turn"
ROLES = ("system", "user", "assistant")

Message = tuple[str, str]  # (role, content)


@dataclasses.dataclass(frozen=True, eq=False)
class Rendered:
    """A document rendered by the chat template (`template.render`): ids int32 [n] and whether
    each id is trained on, train bool [n]."""

    ids: np.ndarray
    train: np.ndarray


@dataclasses.dataclass(frozen=True)
class Record:
    """One record read from a source.

    Attributes:
      origin: where it came from, "file:line" (1-based) or "file#index".
      text: the decoded plain document, or None.
      problem: None, or why there is no document (INVALID_UTF8, INVALID_JSON, MISSING_FIELD,
        WRONG_TYPE, EMPTY_CONTENT, NO_ASSISTANT).
      detail: the field at fault, or None.
      messages: the (role, content) turns of a structured record, or None.
      rendered: the document of a prepared shard, screened and rendered at preparation, or None.
    """

    origin: str
    text: str | None = None
    problem: str | None = None
    messages: tuple[Message, ...] | None = None
    rendered: Rendered | None = None
    detail: str | None = None


def from_value(origin: str, value: Any) -> Record:
    """Record of a field value: str as is, bytes decoded as UTF-8, else MISSING_FIELD."""
    if isinstance(value, str):
        return Record(origin, text=value)
    if isinstance(value, bytes):
        return from_bytes(origin, value)
    return Record(origin, problem=MISSING_FIELD)


def from_bytes(origin: str, raw: bytes) -> Record:
    """Record of UTF-8 bytes; INVALID_UTF8 when they do not decode."""
    try:
        return Record(origin, text=raw.decode("utf-8"))
    except UnicodeDecodeError:
        return Record(origin, problem=INVALID_UTF8)


def _messages(origin: str, value: Any, field: str) -> Record:
    if not isinstance(value, (list, tuple)):
        return Record(origin, problem=WRONG_TYPE, detail=f"{field} is not a list")
    turns = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            return Record(origin, problem=WRONG_TYPE, detail=f"{where} is not an object")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            return Record(
                origin, problem=MISSING_FIELD, detail=f"{where}.{'role' if role is None else 'content'}"
            )
        if role not in ROLES:
            return Record(
                origin, problem=WRONG_TYPE, detail=f"{where}.role={role!r} (roles: {', '.join(ROLES)})"
            )
        if not isinstance(content, str):
            return Record(origin, problem=WRONG_TYPE, detail=f"{where}.content is not a string")
        if not content.strip():
            return Record(origin, problem=EMPTY_CONTENT, detail=f"{where}.content")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        return Record(origin, problem=NO_ASSISTANT, detail=f"{field} has no assistant turn")
    return Record(origin, messages=tuple(turns))


def from_fields(origin: str, obj: Mapping[str, Any], source: SourceConfig) -> Record:
    """Record of the fields of one object (a JSON object or a Parquet row), by `source.format`."""
    values = [obj.get(name) for name in source.fields()]
    fmt = RecordFormat(source.format)
    if fmt == RecordFormat.text:
        return from_value(origin, values[0])
    missing = [name for name, v in zip(source.fields(), values) if v is None]
    if missing:
        return Record(origin, problem=MISSING_FIELD, detail=missing[0])
    if fmt == RecordFormat.chat:
        return _messages(origin, values[0], source.messages_field)
    for name, value in zip(source.fields(), values):
        if not isinstance(value, str):
            return Record(origin, problem=WRONG_TYPE, detail=f"{name} is not a string")
        if not value.strip():
            return Record(origin, problem=EMPTY_CONTENT, detail=name)
    prompt, response = values
    return Record(origin, messages=(("user", prompt), ("assistant", response)))


def from_json(origin: str, raw: bytes, source: SourceConfig) -> Record:
    """Record of the JSON object in `raw` (UTF-8 bytes), read by `from_fields`."""
    decoded = from_bytes(origin, raw)
    if decoded.text is None:
        return decoded
    try:
        obj = json.loads(decoded.text)
    except json.JSONDecodeError:
        return Record(origin, problem=INVALID_JSON)
    if not isinstance(obj, dict):
        return Record(origin, problem=INVALID_JSON)
    return from_fields(origin, obj, source)
