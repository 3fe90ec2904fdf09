"""Checks of a task file (format in `tasks.py`), run when it loads, before any model work: its
settings, then every row (few-shot rows included).  Each error is one line naming the task
file, the row as DATA:LINE and the field.

Settings: `prompt` a str.format template with named fields only; `extract` a valid regular
expression; `stop` a list of non-empty strings; `few_shot` >= 0; `max_new_tokens` >= 1; the
field names (`choices`, `answer`, `target`) strings.
Rows: the prompt renders (every field it names present and formattable); multiple_choice: the
`choices` field a non-empty list of strings and the `answer` field an integer index into it;
generate: the `target` field a string or a number.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

_INTEGERS = {"few_shot": 0, "max_new_tokens": 1}  # key -> smallest allowed value
_FIELD_NAMES = ("choices", "answer", "target")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(raw: dict, path: Path) -> None:
    """The task file's own keys (`raw`, as read from the YAML)."""
    where = f"task file {path}"
    if not isinstance(raw.get("name", ""), str):
        raise ValueError(f"{where}: name={raw['name']!r} must be a string")
    if not isinstance(raw["prompt"], str):
        raise ValueError(f"{where}: prompt={raw['prompt']!r} must be a string (a str.format template)")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(raw["prompt"]) if name is not None]
    except ValueError as err:
        raise ValueError(
            f"{where}: prompt {raw['prompt']!r} is not a valid template ({err}); name row fields as "
            "{field} and write literal braces as {{ and }}"
        ) from None
    positional = [name for name in fields if not name or name.split(".")[0].split("[")[0].isdigit()]
    if positional:
        raise ValueError(
            f"{where}: prompt {raw['prompt']!r} has a positional field {{{positional[0]}}}; name a row "
            "field, e.g. {question} (literal braces: {{ and }})"
        )
    for key in _FIELD_NAMES:
        if key in raw and not (isinstance(raw[key], str) and raw[key]):
            raise ValueError(f"{where}: {key}={raw[key]!r} must be the name of a row field (a string)")
    for key, least in _INTEGERS.items():
        if key in raw and not (_is_int(raw[key]) and raw[key] >= least):
            raise ValueError(f"{where}: {key}={raw[key]!r} must be an integer >= {least}")
    stop = raw.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f'{where}: stop={stop!r} must be a list of non-empty strings, e.g. ["\\n"]')
    extract = raw.get("extract")
    if extract is not None:
        if not isinstance(extract, str):
            raise ValueError(f"{where}: extract={extract!r} must be a regular expression (a string)")
        try:
            re.compile(extract)
        except re.error as err:
            raise ValueError(
                f"{where}: extract={extract!r} is not a valid regular expression ({err})"
            ) from None


def check_row(task, row: dict, where: str) -> None:
    """One row of `task` (a tasks.Task); `where`: "task file T: DATA:LINE"."""
    try:
        task.prompt.format(**row)
    except KeyError as err:
        raise ValueError(
            f"{where}: the prompt names field {err} that the row lacks (row fields: {sorted(row)})"
        ) from None
    except (IndexError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: the prompt {task.prompt!r} does not render this row ({err})") from None
    if task.type == "multiple_choice":
        choices = row.get(task.choices)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError(
                f"{where}: field {task.choices!r} = {choices!r} must be a non-empty list of strings "
                "(the continuations to score)"
            )
        answer = row.get(task.answer)
        if not (_is_int(answer) and 0 <= answer < len(choices)):
            raise ValueError(
                f"{where}: field {task.answer!r} = {answer!r} is not an index of the row's "
                f"{len(choices)} choices (an integer in 0..{len(choices) - 1})"
            )
    else:
        target = row.get(task.target)
        if isinstance(target, bool) or not isinstance(target, (str, int, float)):
            raise ValueError(
                f"{where}: field {task.target!r} = {target!r} must be the expected answer (a string or a number)"
            )
