"""Small JSON Lines input files read strictly (a prompts file, a task's rows): every non-blank
line is one JSON object, and the first line that is not (not UTF-8, not JSON, not an object) is
an error naming the file and the line.  Training sources are read leniently instead (bad records
counted and skipped, `sources.py`)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl_objects(path: str | Path) -> list[tuple[int, dict]]:
    """[(line number, object)] of the non-blank lines of `path`, lines split at "\\n" only (a JSON
    string may hold U+2028); raises ValueError "PATH:LINE: ..." at the first bad line."""
    path = Path(path)
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}:{number}: a line must be a JSON object, got {type(value).__name__}")
            rows.append((number, value))
    return rows
