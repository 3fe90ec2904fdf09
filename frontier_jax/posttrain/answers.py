"""Where the answer sits in a completion: `<answer>...</answer>` tags, a fenced code block."""

from __future__ import annotations

import re

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# the default `format`: an optional <think> block, free text without tags, one <answer> at the end
FORMAT = re.compile(
    r"\s*(?:<think>(?:(?!</?think>).)*</think>)?(?:(?!</?(?:think|answer)>).)*<answer>(?:(?!</?(?:think|answer)>).)+</answer>\s*",
    re.DOTALL,
)
FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def final_answer(completion: str) -> str:
    """The last `<answer>` block's content, else the whole completion (both stripped)."""
    tagged = ANSWER_TAG.findall(completion)
    return (tagged[-1] if tagged else completion).strip()


def code_of(completion: str) -> str:
    """The first fenced block's code (```python / ```py / ```), else the whole completion."""
    fenced = FENCE.search(completion)
    return fenced.group(1) if fenced else completion


def normalise(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding spaces and a final period dropped."""
    return " ".join(str(text).casefold().split()).rstrip(".").strip()
