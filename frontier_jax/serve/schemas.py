"""The request bodies of the OpenAI-compatible endpoints (pydantic; unknown fields are refused).

Fields and defaults follow OpenAI's API (max_tokens 16 for completions, temperature 1) with
vLLM's extensions (top_k, min_tokens, ignore_eos, stop_token_ids, add_generation_prompt).
A field outside its range is a 400 naming it (`errors.validation_error`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from frontier_jax.infer.sampling import MAX_LOGPROBS
from frontier_jax.serve.errors import APIError

Ids = list[Annotated[StrictInt, Field(ge=0)]]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    include_usage: StrictBool = False


class Sampling(Body):
    """The fields completions and chat completions share."""

    model: str | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0  # 0 or -1: off
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: str | list[str] | None = None
    stop_token_ids: Ids | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**32)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    user: str | None = None

    def check(self) -> None:
        """Raises the 400 of a rule between fields."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
        if any(not s for s in self.stop_strings):
            raise APIError(400, "stop strings must be non-empty", "stop")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(Sampling):
    prompt: str | list[str] | Ids | list[Ids]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class ExpertStatsDumpRequest(Body):
    """`POST /expert_stats/dump`: path, a .npz or .json file on the server's file system to
    write the ledger's window to (`runtime.expert_ledger.save_expert_load`), or none."""

    path: str | None = None


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: Ids
