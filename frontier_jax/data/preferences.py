"""Preference pairs for reward-model training and evaluation, read strictly from JSONL.

A record is either
    {"prompt": str, "chosen": str, "rejected": str}             a user turn and two answers
    {"messages": [..., {"role": "assistant", ...}, {"role": "assistant", ...}]}
                                                                the turns before the last two are
                                                                the context, then the chosen and
                                                                the rejected final assistant turn
with an optional "margin" (a number, default 0).  Each side is rendered as a whole chat by the
chat template (`template.render_chat`: the tokenizer's template, else the project's format), so
the reward model reads the bytes a policy is trained and served on.  A bad record (a missing or
empty side, an unknown role, fewer than two final assistant turns, a side longer than `max_len`
tokens) is an error naming FILE:LINE and the field: a reward model must not be fit to pairs
with a silently missing side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from frontier_jax.data.jsonl import read_jsonl_objects
from frontier_jax.data.records import ROLES
from frontier_jax.data.template import ChatTemplate, render_chat
from frontier_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class PreferencePair:
    """One rendered pair: token ids int32 [n] of each whole chat, the margin m of
    -log sigmoid(r_chosen - r_rejected - m), and where it was read ("file:line")."""

    origin: str
    chosen: np.ndarray
    rejected: np.ndarray
    margin: float = 0.0


def _text(row: Mapping, field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        state = "missing" if value is None else "not a string" if not isinstance(value, str) else "empty"
        raise ValueError(
            f"{where}: field {field!r} is {state}: a preference record needs prompt, chosen and rejected"
        )
    return value


def _sides(row: Mapping, where: str) -> tuple[list[dict], list[dict]]:
    """(chosen chat, rejected chat) of a record, as lists of {"role", "content"}."""
    if "messages" not in row:
        context = [{"role": "user", "content": _text(row, "prompt", where)}]
        return (
            context + [{"role": "assistant", "content": _text(row, "chosen", where)}],
            context + [{"role": "assistant", "content": _text(row, "rejected", where)}],
        )
    messages = row["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"{where}: field 'messages' is not a list")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise ValueError(f"{where}: messages[{i}] is not an object with a role in {list(ROLES)}")
        _text(message, "content", f"{where}: messages[{i}]")
    if len(messages) < 2 or any(m["role"] != "assistant" for m in messages[-2:]):
        raise ValueError(
            f"{where}: field 'messages' must end with two assistant turns (the chosen, then the rejected answer)"
        )
    context = [dict(m) for m in messages[:-2]]
    return context + [dict(messages[-2])], context + [dict(messages[-1])]


def read_preferences(
    path: str | Path, tokenizer: Tokenizer, template: ChatTemplate | None, *, max_len: int
) -> list[PreferencePair]:
    """Every record of `path` rendered (module docstring); raises ValueError "FILE:LINE: ..."."""
    pairs = []
    for number, row in read_jsonl_objects(path):
        where = f"{path}:{number}"
        chosen, rejected = _sides(row, where)
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"{where}: field 'margin' is {margin!r}, not a number")
        ids = {}
        for side, chat in (("chosen", chosen), ("rejected", rejected)):
            ids[side] = render_chat(tokenizer, chat, template)[0]
            if len(ids[side]) > max_len:
                raise ValueError(
                    f"{where}: the {side} side renders to {len(ids[side])} tokens, more than {max_len}: "
                    "shorten it or raise train.seq_len"
                )
        pairs.append(PreferencePair(where, ids["chosen"], ids["rejected"], float(margin)))
    if not pairs:
        raise ValueError(f"{path}: no preference records")
    return pairs


def pair_rows(pairs: list[PreferencePair], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows [2P, seq_len] of P pairs: row 2i the chosen side of pair i, row 2i + 1 its rejected side,
    each one sequence from position 0 (segment id 1 on its tokens, 0 on padding); margin [2P]
    float32 (the pair's margin on both rows)."""
    rows = 2 * len(pairs)
    out = {
        "input_ids": np.full((rows, seq_len), pad_id, np.int32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
        "margin": np.repeat(np.asarray([p.margin for p in pairs], np.float32), 2),
    }
    for r, ids in enumerate(ids for p in pairs for ids in (p.chosen, p.rejected)):
        out["input_ids"][r, : len(ids)] = ids
        out["segment_ids"][r, : len(ids)] = 1
        out["positions"][r, : len(ids)] = np.arange(len(ids))
    return out
