"""Raw records: a document's text, or why there is none, with where it came from."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"


@dataclasses.dataclass(frozen=True)
class Record:
    """One record read from a source.

    Attributes:
      origin: where it came from, "file:line" (1-based) or "file#index".
      text: the decoded document, or None when it could not be read.
      problem: None, or why `text` is None (INVALID_UTF8, INVALID_JSON, MISSING_FIELD).
    """

    origin: str
    text: Optional[str] = None
    problem: Optional[str] = None


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


def from_json(origin: str, raw: bytes, text_field: str) -> Record:
    """Record of `text_field` of the JSON object in `raw` (UTF-8 bytes)."""
    decoded = from_bytes(origin, raw)
    if decoded.text is None:
        return decoded
    try:
        obj = json.loads(decoded.text)
    except json.JSONDecodeError:
        return Record(origin, problem=INVALID_JSON)
    if not isinstance(obj, dict):
        return Record(origin, problem=INVALID_JSON)
    return from_value(origin, obj.get(text_field))
