"""The inference engine: continuous batching over the paged latent cache.

    engine = Engine(model, tokenizer=tok)            # or Engine.from_hf(path) / from_checkpoint
    completions = engine.generate(["def f(", [1, 2, 3]], SamplingParams(max_new_tokens=32))

Each `step()`: admit waiting requests into free decode slots; run one prefill chunk of every
prefilling request (expanded MLA, writing the cache); run one decode step of every decoding
request (absorbed MLA); sample each request's next token with its own parameters; retire the
finished ones and free their blocks.  Bad requests (empty prompt, ids outside the vocabulary,
too long, invalid sampling parameters) end at once with finish_reason "error" and a message;
the others run on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from frontier_jax.data.tokenizer import Tokenizer
from frontier_jax.infer.cache import CacheLayout, allocate_cache
from frontier_jax.infer.config import InferConfig
from frontier_jax.infer.sampling import SamplingParams, sample
from frontier_jax.infer.scheduler import Batch, Completion, Request, Scheduler
from frontier_jax.infer.step import make_step
from frontier_jax.model import Transformer
from frontier_jax.model.latent_cache import Pages


class Engine:
    def __init__(self, model: Transformer, *, tokenizer: Tokenizer | None = None,
                 infer: InferConfig | None = None, seed: int = 0, verbose: bool = False):
        self.cfg = model.cfg
        self.infer = (infer or InferConfig()).validate()
        self.tokenizer = tokenizer
        self.seed = seed
        dtype = model.policy.compute_dtype
        self.layout = CacheLayout.plan(self.cfg, self.infer, dtype)
        if verbose:
            print(self.layout.describe(self.cfg, dtype))
        graphdef, self.state = nnx.split(model)
        self.cache = allocate_cache(self.cfg, self.layout, dtype)
        self._prefill = make_step(graphdef, absorbed=False)
        self._decode = make_step(graphdef, absorbed=True, impl=self.infer.decode_attention_impl.value)
        self.scheduler = Scheduler(self.layout, self.infer.max_seqs, self.infer.prefill_chunk)
        self._next_id = 0
        self._done: dict[int, Completion] = {}
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0,
                      "forwards": 0}

    # ----------------------------------------------------------------------- requests
    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> int:
        """Queues one request; returns its id.  An invalid request is finished at once with
        finish_reason "error" (see `result`)."""
        request_id, self._next_id = self._next_id, self._next_id + 1
        params = params or SamplingParams()
        try:
            params.check()
            prompt_ids = self._prompt_ids(prompt)
        except ValueError as err:
            ids = list(prompt) if not isinstance(prompt, str) else []
            self._done[request_id] = Completion(ids, [], None, [], "error", f"request {request_id}: {err}")
            return request_id
        budget = min(len(prompt_ids) + params.max_new_tokens, self.layout.max_len)
        seed = params.seed if params.seed is not None else self.seed + request_id
        self.scheduler.add(Request(request_id, prompt_ids, params, seed, budget))
        return request_id

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("the prompt is text but the engine has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.cfg.vocab_size
        bad = [(j, i) for j, i in enumerate(ids) if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0][1]} at index {bad[0][0]} is outside [0, {vocab}) "
                             f"(model.vocab_size={vocab})")
        limit = self.layout.max_len - 1
        if len(ids) > limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; at most {limit} fit (infer.max_len="
                             f"{self.layout.max_len} holds prompt + generation; model context "
                             f"{self.cfg.max_position_embeddings}): shorten it or raise infer.max_len")
        return ids

    def result(self, request_id: int) -> Completion | None:
        return self._done.get(request_id)

    # ----------------------------------------------------------------------- stepping
    def step(self) -> list[int]:
        """One scheduler iteration (module docstring); returns the ids of requests finished in it."""
        sched = self.scheduler
        sched.admit()
        finished = []
        batch = sched.prefill_batch()
        if batch is not None:
            logits = self._forward(self._prefill, batch, "prefill_s")
            self.stats["prompt_tokens"] += int(batch.write.sum())
            ready = [b for b, r in enumerate(batch.rows) if not r.prefilling]
            finished += self._sample(batch, logits[:, 0], ready)
        batch = sched.decode_batch()
        if batch is not None:
            logits = self._forward(self._decode, batch, "decode_s")
            finished += self._sample(batch, logits[:, 0], range(len(batch.rows)))
        return finished

    def _forward(self, step, batch: Batch, timer: str) -> jax.Array:
        start = time.perf_counter()
        pages = Pages(jnp.asarray(batch.block_table), jnp.asarray(batch.write))
        logits, _, self.cache = step(self.state, self.cache, jnp.asarray(batch.ids),
                                     jnp.asarray(batch.positions), pages, jnp.asarray(batch.select))
        logits.block_until_ready()
        self.stats[timer] += time.perf_counter() - start
        self.stats["forwards"] += 1
        for request, count in zip(batch.rows, batch.write.sum(1)):
            request.computed += int(count)
        return logits

    def _sample(self, batch: Batch, logits: jax.Array, rows) -> list[int]:
        """Samples the next token of batch rows `rows` from logits [B, V]; returns finished ids."""
        if not rows:
            return []
        n = logits.shape[0]
        params = [r.params for r in batch.rows] + [SamplingParams()] * (n - len(batch.rows))
        seeds = [r.seed for r in batch.rows] + [0] * (n - len(batch.rows))
        counters = [len(r.output_ids) for r in batch.rows] + [0] * (n - len(batch.rows))
        tokens, logprobs = sample(logits, jnp.asarray([p.temperature for p in params], jnp.float32),
                                  jnp.asarray([p.top_k for p in params], jnp.int32),
                                  jnp.asarray([p.top_p for p in params], jnp.float32),
                                  jnp.asarray(seeds, jnp.uint32), jnp.asarray(counters, jnp.int32))
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        finished = []
        for b in rows:
            request = batch.rows[b]
            if self._append(request, int(tokens[b]), float(logprobs[b])):
                finished.append(request.id)
        return finished

    def _append(self, request: Request, token: int, logprob: float) -> bool:
        """Adds a generated token; finishes and retires the request when it ends."""
        request.output_ids.append(token)
        request.logprobs.append(logprob)
        self.stats["generated_tokens"] += 1
        params, tok = request.params, self.tokenizer
        stops = set(params.stop_token_ids) | ({tok.eos_id} if tok is not None and not params.ignore_eos else set())
        out = request.output_ids
        if token in stops:
            request.finish_reason, out = "stop", out[:-1]
        text = tok.decode(out) if tok is not None else None
        if text is not None and request.finish_reason is None:
            hits = [text.index(s) for s in params.stop if s in text]
            if hits:
                request.finish_reason, text = "stop", text[:min(hits)]
        if request.finish_reason is None and (len(request.output_ids) >= params.max_new_tokens
                                              or len(request.tokens) >= request.budget):
            request.finish_reason = "length"
        if request.finish_reason is None:
            return False
        request.text = text
        self.scheduler.retire(request)
        self._done[request.id] = request.completion()
        return True

    # ----------------------------------------------------------------------- batch API
    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 progress: bool = False) -> list[Completion]:
        """Runs every prompt to completion (continuous batching); completions in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        ids = [self.submit(prompt, p) for prompt, p in zip(prompts, params)]
        total = sum(p.max_new_tokens for i, p in zip(ids, params) if i not in self._done)
        with tqdm(total=total, unit="tok", desc="generate", disable=not progress) as bar:
            while not self.scheduler.idle:
                before = self.stats["generated_tokens"]
                self.step()
                bar.update(self.stats["generated_tokens"] - before)
        return [self._done.pop(i) for i in ids]
