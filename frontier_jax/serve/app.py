"""The FastAPI application: OpenAI-compatible routes over one `EngineLoop`.

    POST /v1/completions, /v1/chat/completions (JSON or server-sent events with stream=true)
    GET  /v1/models, /health, /metrics, /tokenizer_info;  POST /tokenize, /detokenize

Prompts: a string gets <bos> prepended, token ids are taken verbatim (so /tokenize with
add_special_tokens=true returns exactly the ids a string prompt runs with); chats are rendered
with the chat template and its generation prompt (`data.template.render_prompt`).  With
`echo` and `logprobs`, the prompt's tokens come first in the choice's log-probs, the first one
null, each other log p(token | the tokens before it) from the prefill's logits.

A client that disconnects (streaming or not) has its requests cancelled at once.  Beyond
`serve.max_waiting` queued requests, while draining after SIGTERM, or if the engine thread has
died, new requests get 503 with Retry-After.  Every other failure a request can cause is a 4xx
in OpenAI's error shape (`errors.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from frontier_jax.data.template import ChatTemplate, render_prompt
from frontier_jax.data.tokenizer import END, Tokenizer
from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.runtime.expert_ledger import check_stats_path, save_expert_load
from frontier_jax.serve import schemas
from frontier_jax.serve.config import ServeConfig
from frontier_jax.serve.engine_loop import EngineLoop, Job
from frontier_jax.serve.errors import APIError, error_body, error_response, validation_error
from frontier_jax.serve.metrics import Metrics, snapshot
from frontier_jax.serve.replicate import Leader
from frontier_jax.serve.responses import Choice, LogprobWriter, now, response_id, sse, usage

DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler checks that its client is still there


class Server:
    """What the routes share: the engine (read-only here: tokenizer, limits), its loop, metrics."""

    def __init__(
        self,
        engine: Engine,
        config: ServeConfig,
        *,
        model_name: str,
        root: str = "",
        api_key: str | None = None,
        template: ChatTemplate | None = None,
        leader: Leader | None = None,
    ):
        """leader: on a multi-process mesh, process 0's `replicate.Leader` over `engine`."""
        if engine.tokenizer is None:
            raise ValueError("serve needs a tokenizer: the checkpoint or --hf directory has none")
        self.engine, self.config = engine, config.validate()
        self.tokenizer: Tokenizer = engine.tokenizer
        self.model_name, self.root, self.api_key, self.template = model_name, root, api_key, template
        self.max_len = engine.layout.max_len
        self.metrics = Metrics()
        self.loop = EngineLoop(engine, self.metrics, leader)
        self.writer = LogprobWriter(self.tokenizer)
        self.draining = False

    # ------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404, f"The model `{name}` does not exist (this server has `{self.model_name}`).", "model"
            )

    def check_admission(self) -> None:
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.draining:
            raise APIError(503, "the server is shutting down", headers=retry)
        if not self.loop.alive:
            raise APIError(503, f"the engine stopped: {self.loop.error!r}", headers=retry)
        if self.loop.waiting >= self.config.max_waiting:
            raise APIError(
                503,
                f"{self.loop.waiting} requests are waiting (serve.max_waiting={self.config.max_waiting}): retry later",
                headers=retry,
            )

    def check_prompt(self, ids: list[int], where: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{where} is empty: give at least one token", "prompt")
        vocab = self.engine.cfg.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(400, f"{where}: token id {bad} is outside [0, {vocab})", "prompt")
        if len(ids) > self.max_len - 1:
            raise APIError(
                400,
                f"{where} has {len(ids)} tokens; this model's context is {self.max_len} tokens (prompt + "
                f"generation), so at most {self.max_len - 1} fit",
                "prompt",
            )
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.tokenizer.bos_id] * add_special_tokens + self.tokenizer.encode(text)

    def chat_ids(self, messages: list[schemas.Message], add_generation_prompt: bool = True) -> list[int]:
        turns = [{"role": m.role, "content": m.text} for m in messages]
        try:
            if add_generation_prompt:
                return render_prompt(self.tokenizer, turns, self.template)
            from frontier_jax.data.template import render_chat

            return render_chat(self.tokenizer, turns, self.template)[0].tolist()
        except (ValueError, KeyError) as err:
            raise APIError(400, f"messages: {err}", "messages") from err

    def sampling(
        self, body: schemas.Sampling, prompts: list[list[int]], max_tokens: int, **extra
    ) -> SamplingParams:
        """The engine's parameters of `body` for `prompts`, checked as the engine would (400)."""
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=max(body.top_k, 0),
            top_p=body.top_p,
            seed=body.seed,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            stop=body.stop_strings,
            ignore_eos=body.ignore_eos,
            n=body.n,
            min_tokens=body.min_tokens,
            **extra,
        )
        try:
            for prompt in prompts:
                self.engine.check(prompt, params)
        except ValueError as err:
            message = str(err)
            param = message.split("=", 1)[0] if "=" in message.split(" ", 1)[0] else None
            raise APIError(400, message, param) from err
        return params


async def parse(request: Request, model: type[BaseModel]):
    """The request's JSON body as `model` (400 on malformed JSON or a body that does not fit)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"malformed JSON body: {err}") from err
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from err
    if isinstance(body, schemas.Sampling):
        body.check()
    return body


class Run:
    """One job's requests: its events collected into choices, cancelled if left unfinished."""

    def __init__(self, server: Server, prompts: list[list[int]], params: SamplingParams):
        self.server, self.params = server, params
        self.job = Job(prompts, params, asyncio.get_running_loop(), asyncio.Queue())
        self.choices = [Choice() for _ in range(len(prompts) * params.n)]
        self.remaining = len(self.choices)
        server.loop.submit(self.job)

    def index(self, k: int, request_id: int) -> int:
        """The choice index of sample j of prompt k: k n + j."""
        return k * self.params.n + request_id - self.job.first_ids[k]

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, object]]:
        """(choice index, event) until every request ends; an engine error is a 400.  With
        `request`, polls for a disconnected client while waiting."""
        while self.remaining:
            try:
                k, event, error = await asyncio.wait_for(self.job.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if not self.server.loop.alive:
                    raise APIError(503, f"the engine stopped: {self.server.loop.error!r}") from None
                if request is not None and await request.is_disconnected():
                    raise APIError(499, "the client disconnected") from None
                continue
            if error is not None:
                raise APIError(400, error.split(": ", 1)[-1])
            i = self.index(k, event.request_id)
            choice = self.choices[i]
            if event.token is not None:
                choice.ids.append(event.token)
                choice.logprobs.append(event.logprob)
                choice.top.append(event.top_logprobs or [])
                if event.prompt_logprobs is not None:
                    choice.prompt_logprobs = event.prompt_logprobs
                if event.cached_tokens is not None:
                    choice.cached_tokens = event.cached_tokens
            choice.text += event.text or ""
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
                self.remaining -= 1
            yield i, event

    def close(self) -> None:
        if self.remaining:
            self.server.loop.cancel(self.job)
            self.remaining = 0

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.ids) for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache, each prompt counted once (its n samples
        share one prefill)."""
        return sum(c.cached_tokens for c in self.choices[:: self.params.n])


def _max_tokens(server: Server, prompts: list[list[int]], asked: int | None) -> int:
    """max_tokens, or when not given all the context left after the longest prompt."""
    return asked if asked is not None else max(server.max_len - max(map(len, prompts)), 1)


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        yield
        server.loop.stop()

    async def authorize(request: Request) -> None:
        if server.api_key is not None and request.headers.get("authorization") != f"Bearer {server.api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)")

    app = FastAPI(title="frontier_jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    api = APIRouter(dependencies=[Depends(authorize)])  # every route but /health

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        return JSONResponse(error_body(500, f"internal error: {err!r}"), 500)

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            return error_response(APIError(503, "the engine stopped"))
        return Response(status_code=200)

    @api.get("/v1/models")
    async def models():
        card = {
            "id": server.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "frontier_jax",
            "root": server.root or server.model_name,
            "parent": None,
            "max_model_len": server.max_len,
        }
        return {"object": "list", "data": [card]}

    @api.get("/metrics")
    async def metrics():
        view = await server.loop.call(lambda engine: snapshot(engine, server.loop.waiting))
        return PlainTextResponse(server.metrics.render(view), media_type="text/plain; version=0.0.4")

    @api.post("/expert_stats/dump")
    async def expert_stats_dump(request: Request):
        """The engine's expert-load ledger: per MoE layer the tokens routed to each expert over
        the last experts.window_steps engine steps (`load` [layers][experts] and the positions
        counted, `tokens`), written to `path` as well when one is given (.npz keeps the steps, so
        `frontier-jax experts plan --stats` reads either)."""
        body = await parse(request, schemas.ExpertStatsDumpRequest) if await request.body() else None
        path = body.path if body is not None else None
        if not server.engine.cfg.num_moe_layers:
            raise APIError(400, "the served model has no MoE layers: there is no expert load to dump")
        if path is not None:
            try:
                check_stats_path(path)
            except ValueError as err:
                raise APIError(400, str(err), "path") from None
        steps = await server.loop.call(lambda engine: engine.expert_ledger.steps())
        if path is not None:
            save_expert_load(path, steps)
        window = steps.window()
        layers, experts = window.load.shape
        return {
            "layers": layers,
            "experts": experts,
            "steps": len(steps.tokens),
            "tokens": window.tokens,
            "load": window.load.tolist(),
            "path": path,
        }

    @api.get("/tokenizer_info")
    async def tokenizer_info():
        names = {i: s for s, i in server.tokenizer.special_strings().items()}
        tok = server.tokenizer
        return {
            "tokenizer_class": "frontier_jax",
            "bos_token": names.get(tok.bos_id),
            "eos_token": names.get(tok.eos_id),
            "pad_token": names.get(tok.pad_id),
            "model_max_length": server.max_len,
            "vocab_size": tok.vocab_size,
            "chat_template": server.template.source if server.template is not None else None,
        }

    @api.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse(request, schemas.TokenizeRequest)
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if body.prompt is not None:
            ids = server.encode(body.prompt, body.add_special_tokens)
        else:
            ids = server.chat_ids(body.messages, body.add_generation_prompt)
        return {"count": len(ids), "max_model_len": server.max_len, "tokens": ids}

    @api.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse(request, schemas.DetokenizeRequest)
        server.check_model(body.model)
        vocab = server.tokenizer.vocab_size
        bad = next((i for i in body.tokens if i >= vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is outside [0, {vocab})", "tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}

    @api.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, schemas.CompletionRequest)
        server.check_model(body.model)
        prompts = _completion_prompts(server, body.prompt)
        k = body.logprobs
        params = server.sampling(
            body,
            prompts,
            body.max_tokens,
            logprobs=k or 0,
            prompt_logprobs=k if body.echo and k is not None else None,
        )
        server.check_admission()
        run = Run(server, prompts, params)
        if body.stream:
            return _stream(run, _completion_chunks(server, run, body, prompts))
        try:
            async for _ in run.events(request):
                pass
        finally:
            run.close()
        return _completion_body(server, run, body, prompts)

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, schemas.ChatRequest)
        server.check_model(body.model)
        prompt = server.check_prompt(server.chat_ids(body.messages, body.add_generation_prompt), "the chat")
        stop_ids = (server.tokenizer.special_id(END),) if server.template is None else ()
        body.stop_token_ids = list(body.stop_token_ids or ()) + list(stop_ids)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        k = (body.top_logprobs or 0) if body.logprobs else 0
        params = server.sampling(body, [prompt], _max_tokens(server, [prompt], asked), logprobs=k)
        server.check_admission()
        run = Run(server, [prompt], params)
        if body.stream:
            return _stream(run, _chat_chunks(server, run, body, len(prompt)))
        try:
            async for _ in run.events(request):
                pass
        finally:
            run.close()
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": server.writer.chat(c.ids, c.logprobs, c.top) if body.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(run.choices)
        ]
        return {
            "id": response_id("chatcmpl"),
            "object": "chat.completion",
            "created": now(),
            "model": server.model_name,
            "choices": choices,
            "usage": usage(len(prompt), run.completion_tokens, run.cached_tokens),
        }

    app.include_router(api)
    return app


def _prompt_texts(server: Server, prompt, prompts: list[list[int]]) -> list[str]:
    """What `echo` sends back of each prompt: the string as given, or the decoded ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], str):
        return list(prompt)
    return [server.tokenizer.decode(p) for p in prompts]


def _completion_prompts(server: Server, prompt) -> list[list[int]]:
    """The request's prompts as token ids (strings with <bos>, ids verbatim)."""
    if isinstance(prompt, str):
        prompts = [server.encode(prompt)]
    elif not prompt:
        raise APIError(
            400, "prompt is an empty list: give a string, strings, token ids or lists of them", "prompt"
        )
    elif isinstance(prompt[0], str):
        prompts = [server.encode(p) for p in prompt]
    elif isinstance(prompt[0], list):
        prompts = [list(p) for p in prompt]
    else:
        prompts = [list(prompt)]
    return [
        server.check_prompt(p, f"prompt {k}" if len(prompts) > 1 else "the prompt")
        for k, p in enumerate(prompts)
    ]


def _echo(server: Server, body, prompts, k: int, choice: Choice) -> tuple[str, dict | None]:
    """(the prompt's text, its log-probs) for an echoed choice of prompt k."""
    prompt = prompts[k]
    text = _prompt_texts(server, body.prompt, prompts)[k]
    if body.logprobs is None:
        return text, None
    values, tops = server.writer.prompt(choice.prompt_logprobs or [None] * len(prompt))
    return text, server.writer.legacy(prompt, values, tops, 0)


def _completion_body(server: Server, run: Run, body, prompts) -> dict:
    choices = []
    for i, c in enumerate(run.choices):
        k = i // run.params.n
        text, logprobs, offset = c.text, None, 0
        if body.echo:
            prefix, logprobs = _echo(server, body, prompts, k, c)
            text, offset = prefix + text, len(prefix)
        if body.logprobs is not None:
            generated = server.writer.legacy(c.ids, c.logprobs, c.top, offset)
            logprobs = (
                generated if logprobs is None else {key: logprobs[key] + generated[key] for key in generated}
            )
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
    return {
        "id": response_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": server.model_name,
        "choices": choices,
        "usage": usage(sum(map(len, prompts)), run.completion_tokens, run.cached_tokens),
    }


def _chunker(server: Server, body, kind: str, obj: str):
    """(chunk(choices, usage) -> one server-sent event of a stream's chunk object `obj`, with the
    usage when the request asked for it (stream_options.include_usage), include_usage)."""
    rid, created = response_id(kind), now()
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(choices: list[dict], usage_value=None) -> str:
        out = {"id": rid, "object": obj, "created": created, "model": server.model_name, "choices": choices}
        if include_usage:
            out["usage"] = usage_value
        return sse(out)

    return chunk, include_usage


async def _completion_chunks(server: Server, run: Run, body, prompts) -> AsyncIterator[str]:
    chunk, include_usage = _chunker(server, body, "cmpl", "text_completion")

    offsets = [0] * len(run.choices)
    echoed = [False] * len(run.choices)
    async for i, event in run.events():
        c = run.choices[i]
        pieces, logprobs = [], None
        if body.echo and not echoed[i] and (event.token is not None or event.finish_reason):
            echoed[i] = True
            prefix, logprobs = _echo(server, body, prompts, i // run.params.n, c)
            pieces.append(prefix)
            offsets[i] += len(prefix)
        if event.token is not None and body.logprobs is not None:
            generated = server.writer.legacy(
                [event.token], [event.logprob], [event.top_logprobs or []], offsets[i]
            )
            logprobs = (
                generated if logprobs is None else {key: logprobs[key] + generated[key] for key in generated}
            )
        pieces.append(event.text or "")
        offsets[i] += len(event.text or "")
        yield chunk(
            [
                {
                    "index": i,
                    "text": "".join(pieces),
                    "logprobs": logprobs,
                    "finish_reason": event.finish_reason,
                }
            ]
        )
    if include_usage:
        yield chunk([], usage(sum(map(len, prompts)), run.completion_tokens, run.cached_tokens))
    yield sse("[DONE]")


async def _chat_chunks(server: Server, run: Run, body, prompt_tokens: int) -> AsyncIterator[str]:
    chunk, include_usage = _chunker(server, body, "chatcmpl", "chat.completion.chunk")

    for i in range(len(run.choices)):
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    async for i, event in run.events():
        logprobs = None
        if body.logprobs and event.token is not None:
            logprobs = server.writer.chat([event.token], [event.logprob], [event.top_logprobs or []])
        delta = {"content": event.text} if event.text else {}
        yield chunk(
            [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}]
        )
    if include_usage:
        yield chunk([], usage(prompt_tokens, run.completion_tokens, run.cached_tokens))
    yield sse("[DONE]")


def _stream(run: Run, chunks: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events of `chunks`; a client that goes away cancels the run's requests (the
    response task is cancelled, the generator closed), as does an error mid-stream (sent as an
    error event first)."""

    async def body():
        try:
            async for item in chunks:
                yield item
        except APIError as err:
            yield sse(error_body(err.status, err.message, err.param))
            yield sse("[DONE]")
        finally:
            run.close()

    return StreamingResponse(body(), media_type="text/event-stream")
