"""How post-training renders a prompt and a completion for the model: the run's chat template.

The prompt is the user's turn and the completion the assistant's, rendered by the chat template
of the run's tokenizer (`tokenizer_config.json`'s `chat_template` beside a `tokenizer.json`), or
the project's own format without one (`data.template`): generation prompts for the engine, and
whole conversations for a reward model, the same bytes SFT and preference training read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from frontier_jax.data.template import ChatTemplate, render_chat, render_prompt
from frontier_jax.data.tokenizer import BYTE_TOKENIZER, Tokenizer


def run_template(run_config: Mapping) -> ChatTemplate | None:
    """The chat template of a saved run config's tokenizer (None: the project's format)."""
    path = run_config.get("data", {}).get("tokenizer", BYTE_TOKENIZER)
    if path == BYTE_TOKENIZER:
        return None
    return ChatTemplate.load(Path(path).parent if Path(path).is_file() else path)


def prompt_ids(tokenizer: Tokenizer, template: ChatTemplate | None, prompt: str) -> list[int]:
    """The generation prompt of one user turn (the assistant's tag last, no end token)."""
    return render_prompt(tokenizer, [("user", prompt)], template)


def conversation_ids(
    tokenizer: Tokenizer, template: ChatTemplate | None, prompt: str, completion: str
) -> list[int]:
    """The whole exchange: the user's prompt and the assistant's completion, ended."""
    return render_chat(tokenizer, [("user", prompt), ("assistant", completion)], template)[0].tolist()
