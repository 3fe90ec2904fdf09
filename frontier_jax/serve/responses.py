"""OpenAI response bodies built from the engine's token events: choices, log-probs (the
completions API's legacy `tokens / token_logprobs / top_logprobs / text_offset` and the chat
API's `content` list), streaming chunks and usage."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from frontier_jax.data.tokenizer import Tokenizer


@dataclass
class Choice:
    """What one sample of one prompt produced so far."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_logprobs: list | None = None


def response_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class LogprobWriter:
    """Log-prob fields of token ids in a choice, strings by `tokenizer.decode([id])`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def legacy(self, ids, logprobs, tops, offset: int) -> dict:
        """The completions API's logprobs of tokens `ids` (logprobs[i] None: not scored, e.g. the
        first prompt token; tops[i] None likewise) whose text starts at character `offset`."""
        tokens, offsets = [], []
        for token_id in ids:
            tokens.append(self.token(token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": list(logprobs),
            "top_logprobs": [None if top is None else {self.token(t): v for t, v in top} for top in tops],
            "text_offset": offsets,
        }

    def chat(self, ids, logprobs, tops) -> dict:
        """The chat API's logprobs of generated tokens `ids`."""

        def entry(token_id: int, value: float) -> dict:
            text = self.token(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(t, v), "top_logprobs": [entry(a, w) for a, w in top]}
                for t, v, top in zip(ids, logprobs, tops)
            ]
        }

    @staticmethod
    def prompt(scores: list) -> tuple[list, list]:
        """(log p, alternatives) of each prompt token from `Completion.prompt_logprobs` (None first)."""
        values = [None if s is None else s[0] for s in scores]
        tops = [None if s is None else s[1] for s in scores]
        return values, tops
