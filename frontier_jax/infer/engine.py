"""The inference engine: continuous batching over the paged latent cache.

    engine = Engine(model, tokenizer=tok)            # or Engine.from_hf(path) / from_checkpoint
    completions = engine.generate(["def f(", [1, 2, 3]], SamplingParams(max_new_tokens=32))

Each `step()`: admit waiting requests into free decode slots; run one prefill chunk of every
prefilling request (expanded MLA, writing the cache); run one decode step of every decoding
request (absorbed MLA); sample each request's next token with its own parameters; retire the
finished ones and free their blocks.

Decoding is asynchronous (infer.async_decode, the default): a step dispatches decode step n+1
before reading back step n's tokens.  Step n+1 takes step n's sampled tokens straight from the
device; its positions and block tables are known on the host without them (each decoding row
advances one position).  Then step n's tokens are read back (one transfer) and appended, stop
conditions checked, while the device runs step n+1.  A row that step n finishes (a stop token
or string) is already in step n+1: that step's token for it is discarded, never emitted nor
counted.  Rows whose next token is sure to end them (max_new_tokens, the cache budget) are left
out of step n+1.  Freeing a finished request's blocks right away is safe: step n+1 has its block
table already, and any later step that reuses the blocks runs on the cache step n+1 returns
(donated, so the device runs them in order).  Greedy and seeded tokens equal the synchronous
loop's: the same step programs, and token n of a request draws with key fold_in(key(seed), n)
whichever loop runs it.  A finished request's slot is refilled one step later than in the
synchronous loop (its last token is read a step later), so batch mates may differ, which moves
logits by float rounding only.  Speculative decoding stays synchronous.

Bad requests (empty prompt, ids outside the vocabulary,
too long, invalid sampling parameters) end at once with finish_reason "error" and a message;
the others run on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from omegaconf import OmegaConf
from tqdm import tqdm

from frontier_jax.convert import from_hf
from frontier_jax.data.tokenizer import Tokenizer, load_tokenizer
from frontier_jax.infer.cache import CacheLayout, allocate_cache
from frontier_jax.infer.config import DecodeAttentionImpl, InferConfig, Speculative
from frontier_jax.infer.sampling import SamplingParams, sample
from frontier_jax.infer.scheduler import Batch, Completion, Request, Scheduler
from frontier_jax.infer.speculative import MTPDecoder, accept
from frontier_jax.infer.step import make_decode_step, make_step, pack_decode
from frontier_jax.model import Transformer
from frontier_jax.model.latent_cache import Pages
from frontier_jax.parallel.mesh import state_shardings
from frontier_jax.parallel.rules import DEFAULT_RULES, use_sharding
from frontier_jax.runtime.restore import restore_params


@dataclasses.dataclass
class InFlight:
    """A dispatched decode step whose sampled tokens are not read back yet: tokens [R] and
    logprobs [B] of rows b < len(rows) (device arrays)."""

    rows: list[Request]
    tokens: jax.Array
    logprobs: jax.Array


def _infer_config(base: InferConfig, changes: InferConfig | dict | None) -> InferConfig:
    if isinstance(changes, InferConfig):
        return changes
    return dataclasses.replace(base, **(changes or {}))


class Engine:
    def __init__(
        self,
        model: Transformer,
        *,
        tokenizer: Tokenizer | None = None,
        infer: InferConfig | None = None,
        mesh: Mesh | None = None,
        rules: Mapping[str, Sequence[str]] | None = None,
        seed: int = 0,
        verbose: bool = False,
    ):
        """mesh, rules: parameters sharded by the logical-axis rules (default
        `parallel.rules.DEFAULT_RULES`), activations constrained by them, the cache replicated and
        every step's rows a multiple of the batch split; build `model` with the matching expert
        dispatcher (`parallel.expert.expert_dispatcher(mesh, rules)`).  None: one device."""
        self.cfg = model.cfg
        self.infer = (infer or InferConfig()).validate()
        self.tokenizer = tokenizer
        self.seed = seed
        dtype = model.policy.compute_dtype
        speculative = Speculative(self.infer.speculative) == Speculative.MTP
        if speculative and not self.cfg.mtp_depth:
            raise ValueError(
                "infer.speculative=mtp needs a model with MTP modules (model.mtp_depth > 0); "
                "this one has none: use infer.speculative=none"
            )
        self.layout = CacheLayout.plan(self.cfg, self.infer, dtype, self.cfg.mtp_depth if speculative else 0)
        if verbose:
            print(self.layout.describe(self.cfg, dtype))
        graphdef, state = nnx.split(model)
        self.cache = allocate_cache(self.cfg, self.layout, dtype)
        self.mesh, self.rules = mesh, dict(rules or DEFAULT_RULES)
        if mesh is None:
            self.state, min_rows = state, 1
        else:
            self.state = jax.device_put(nnx.to_pure_dict(state), state_shardings(state, mesh, self.rules))
            self.cache = jax.device_put(self.cache, NamedSharding(mesh, PartitionSpec()))
            min_rows = math.prod(mesh.shape[a] for a in self.rules["batch"] if a in mesh.shape)
        impl = DecodeAttentionImpl(self.infer.decode_attention_impl).value
        self._prefill = make_step(graphdef, absorbed=False)
        self._decode = make_step(graphdef, absorbed=True, impl=impl)
        self._decode_sample = make_decode_step(graphdef, impl=impl)
        self.scheduler = Scheduler(self.layout, self.infer.max_seqs, self.infer.prefill_chunk, min_rows)
        self._no_tokens = jnp.zeros(self.scheduler.max_rows, jnp.int32)  # `previous` with nothing in flight
        self._in_flight: InFlight | None = None
        self._mtp = (
            MTPDecoder(graphdef, self.cfg, self.scheduler, self.infer.prefill_chunk, impl)
            if speculative
            else None
        )
        self._next_id = 0
        self._done: dict[int, Completion] = {}
        self.stats = {
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "prefill_s": 0.0,
            "decode_s": 0.0,
            "forwards": 0,
            "decode_steps": 0,
            "decode_context": 0,
        }

    @property
    def speculative_stats(self) -> dict:
        """MTP drafting: drafts proposed and accepted, acceptance rate, and tokens emitted per
        main-model decode forward (1 without speculation)."""
        if self._mtp is None:
            return {}
        s = self._mtp.stats
        return {
            **s,
            "acceptance_rate": s["accepted"] / max(s["drafted"], 1),
            "tokens_per_forward": (s["accepted"] + s["verify_forwards"]) / max(s["verify_forwards"], 1),
        }

    # ----------------------------------------------------------------------- loading
    @classmethod
    def from_hf(
        cls, path: str, *, dtype="float32", mesh=None, infer: InferConfig | dict | None = None, **kwargs
    ) -> Engine:
        """An engine over the Hugging Face checkpoint directory `path` (`convert.from_hf`), with
        its tokenizer.json when present."""
        _, model = from_hf(path, dtype=dtype, mesh=mesh, rules=kwargs.get("rules"))
        tokenizer_file = Path(path) / "tokenizer.json"
        tokenizer = load_tokenizer(str(tokenizer_file)) if tokenizer_file.is_file() else None
        return cls(model, tokenizer=tokenizer, infer=_infer_config(InferConfig(), infer), **kwargs)

    @classmethod
    def from_checkpoint(
        cls,
        run_dir: str,
        step: int | None = None,
        *,
        mesh=None,
        dtype=None,
        infer: InferConfig | dict | None = None,
        **kwargs,
    ) -> Engine:
        """An engine over a training run's checkpoint (latest step, or `step`, or the step of a
        checkpoints/STEP path): its parameters only (`runtime.restore.restore_params`, onto
        `mesh`: a Mesh, a MeshConfig or None for one device; floating parameters cast to
        `dtype`), its config (the `infer` section updated by `infer`) and its tokenizer."""
        restored = restore_params(run_dir, step, mesh=mesh, dtype=dtype)
        saved = restored.config
        tokenizer = restored.tokenizer()
        saved_infer = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(InferConfig), saved.get("infer", {}))
        )
        program = restored.program
        return cls(
            restored.model(),
            tokenizer=tokenizer,
            infer=_infer_config(saved_infer, infer),
            mesh=None if mesh is None else program.mesh,
            rules=program.rules,
            **kwargs,
        )

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
            raise ValueError(
                f"prompt token id {bad[0][1]} at index {bad[0][0]} is outside [0, {vocab}) "
                f"(model.vocab_size={vocab})"
            )
        limit = self.layout.max_len - 1
        if len(ids) > limit:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; at most {limit} fit (infer.max_len="
                f"{self.layout.max_len} holds prompt + generation; model context "
                f"{self.cfg.max_position_embeddings}): shorten it or raise infer.max_len"
            )
        return ids

    def result(self, request_id: int) -> Completion | None:
        return self._done.get(request_id)

    # ----------------------------------------------------------------------- stepping
    def step(self) -> list[int]:
        """One scheduler iteration (module docstring); returns the ids of requests finished in it."""
        if self.mesh is None:
            return self._step()
        with use_sharding(self.mesh, self.rules):
            return self._step()

    def _step(self) -> list[int]:
        sched = self.scheduler
        sched.admit()
        finished = []
        start = time.perf_counter()
        batch = sched.prefill_batch(all_positions=self._mtp is not None)
        if batch is not None:
            counts = batch.write.sum(1)
            logits, hidden = self._forward(self._prefill, batch)
            self.stats["prompt_tokens"] += int(counts.sum())
            if self._mtp is not None:
                self._keep_hidden(batch.rows, batch.positions[:, 0], hidden, counts)
                logits = logits[jnp.arange(logits.shape[0]), jnp.asarray(np.maximum(counts - 1, 0))]
            else:
                logits = logits[:, 0]
            finished += self._sample(batch, logits, [b for b, r in enumerate(batch.rows) if not r.prefilling])
        decode_start = time.perf_counter()
        self.stats["prefill_s"] += decode_start - start
        rows = sched.decoding()
        if self._mtp is None:
            finished += self._decode_step(rows)
        elif rows:
            self._count_decode(rows)
            finished += self._speculative_step(rows)
        self.stats["decode_s"] += time.perf_counter() - decode_start
        return finished

    def _count_decode(self, rows: list[Request]) -> None:
        self.stats["decode_steps"] += 1
        self.stats["decode_context"] += sum(r.computed for r in rows)  # cached tokens the step reads

    def _decode_step(self, rows: list[Request]) -> list[int]:
        """Dispatches a decode step of the decoding `rows`, then reads back the step in flight
        before it (asynchronous) or this one (synchronous); returns the finished ids."""
        previous, self._in_flight = self._in_flight, None
        waiting = {r.id: b for b, r in enumerate(previous.rows)} if previous else {}
        rows = [r for r in rows if not (r.id in waiting and r.reaches_limit(1))]
        current = self._dispatch(rows, previous, waiting) if rows else None
        finished = self._read_back(previous) if previous else []
        if current is not None and not self.infer.async_decode:
            finished += self._read_back(current)
        elif current is not None and any(r.finish_reason is None for r in current.rows):
            self._in_flight = current
        return finished

    def _dispatch(self, rows: list[Request], previous: InFlight | None, waiting: dict[int, int]) -> InFlight:
        """Launches one decode-and-sample step (`step.make_decode_step`) of `rows`; a row in
        `waiting` (id -> row of `previous`) takes its input token from previous's tokens."""
        self._count_decode(rows)
        sched = self.scheduler
        n = sched.rows_for(len(rows))
        packed = pack_decode(
            n,
            [0 if r.id in waiting else r.output_ids[-1] for r in rows],
            [waiting.get(r.id, -1) for r in rows],
            [r.computed for r in rows],
            [r.params for r in rows],
            [r.seed for r in rows],
            [len(r.output_ids) + (r.id in waiting) for r in rows],
            sched.table(rows, [r.computed + 1 for r in rows], n),
        )
        previous_tokens = previous.tokens if previous else self._no_tokens
        tokens, logprobs, self.cache = self._decode_sample(
            self.state, self.cache, previous_tokens, jnp.asarray(packed)
        )
        tokens.copy_to_host_async()
        logprobs.copy_to_host_async()
        self.stats["forwards"] += 1
        for request in rows:
            request.computed += 1
        return InFlight(rows, tokens, logprobs)

    def _read_back(self, step: InFlight) -> list[int]:
        """Appends `step`'s tokens (one transfer) to its rows that are still running; a row
        finished meanwhile drops its token.  Returns the ids finished now."""
        tokens, logprobs = jax.device_get((step.tokens, step.logprobs))
        return [
            r.id
            for b, r in enumerate(step.rows)
            if r.finish_reason is None and self._append(r, int(tokens[b]), float(logprobs[b]))
        ]

    def _forward(self, step, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Runs `step` on `batch`, advances each row's cached length; (logits, hidden)."""
        pages = Pages(jnp.asarray(batch.block_table), jnp.asarray(batch.write))
        logits, hidden, self.cache = step(
            self.state,
            self.cache,
            jnp.asarray(batch.ids),
            jnp.asarray(batch.positions),
            pages,
            jnp.asarray(batch.select),
        )
        self.stats["forwards"] += 1
        for request, count in zip(batch.rows, batch.write.sum(1)):
            request.computed += int(count)
        return logits, hidden

    @staticmethod
    def _keep_hidden(rows: list[Request], starts, hidden: jax.Array, counts) -> None:
        """Stores g^0 of the first counts[b] positions of each row (the MTP drafts read them)."""
        hidden = np.asarray(hidden, np.float32)
        for b, request in enumerate(rows):
            for t in range(int(counts[b])):
                request.hidden[int(starts[b]) + t] = hidden[b, t]

    def _sampling_arrays(self, rows: list[Request], n: int) -> tuple:
        """Per-row (temperature, top_k, top_p, seed, tokens generated so far), padded to n rows."""
        pad = n - len(rows)
        params = [r.params for r in rows] + [SamplingParams()] * pad
        return (
            jnp.asarray([p.temperature for p in params], jnp.float32),
            jnp.asarray([p.top_k for p in params], jnp.int32),
            jnp.asarray([p.top_p for p in params], jnp.float32),
            jnp.asarray([r.seed for r in rows] + [0] * pad, jnp.uint32),
            jnp.asarray([len(r.output_ids) for r in rows] + [0] * pad, jnp.int32),
        )

    def _speculative_step(self, rows: list[Request]) -> list[int]:
        """Draft, verify, accept and roll back (`speculative.py`) for every decoding request."""
        drafts, self.cache = self._mtp.draft(self.state, self.cache, rows)
        batch = self.scheduler.decode_batch(rows, drafts.tolist())
        lengths = [r.length for r in rows]
        logits, hidden = self._forward(self._decode, batch)
        n = logits.shape[0]
        padded = np.zeros((n, drafts.shape[1]), np.int32)
        padded[: len(rows)] = drafts
        kept, tokens, logprobs = accept(logits, jnp.asarray(padded), *self._sampling_arrays(rows, n))
        kept, tokens, logprobs = np.asarray(kept), np.asarray(tokens), np.asarray(logprobs)
        stats = self._mtp.stats
        stats["verify_forwards"] += 1
        finished = []
        for b, (request, length) in enumerate(zip(rows, lengths)):
            k = int(kept[b])
            stats["drafted"] += drafts.shape[1]
            stats["accepted"] += k
            request.computed = length + k  # the cache keeps t_{L-1} and the k kept drafts
            self._keep_hidden([request], [length - 1], hidden[b : b + 1], [k + 1])
            for i in range(k + 1):
                if self._append(request, int(tokens[b, i]), float(logprobs[b, i])):
                    finished.append(request.id)
                    break
        return finished

    def _sample(self, batch: Batch, logits: jax.Array, rows) -> list[int]:
        """Samples the next token of batch rows `rows` from logits [B, V]; returns finished ids."""
        if not rows:
            return []
        tokens, logprobs = sample(logits, *self._sampling_arrays(batch.rows, logits.shape[0]))
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
        stops = set(params.stop_token_ids) | (
            {tok.eos_id} if tok is not None and not params.ignore_eos else set()
        )
        out = request.output_ids
        if token in stops:
            request.finish_reason, out = "stop", out[:-1]
        text = tok.decode(out) if tok is not None else None
        if text is not None and request.finish_reason is None:
            hits = [text.index(s) for s in params.stop if s in text]
            if hits:
                request.finish_reason, text = "stop", text[: min(hits)]
        if request.finish_reason is None and request.reaches_limit():
            request.finish_reason = "length"
        if request.finish_reason is None:
            return False
        request.text = text
        self.scheduler.retire(request)
        self._done[request.id] = request.completion()
        return True

    # ----------------------------------------------------------------------- batch API
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[Completion]:
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
