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

With infer.decode_steps_per_dispatch = n > 1 a step dispatches one program of n decode steps
(`step.make_decode_steps`: sampling and stop checks on the device) and reads its tokens [n, B]
back at once, synchronously (`_decode_steps_block`): the same tokens as n one-step dispatches,
handed over in bursts of up to n; a request that ends (stop, length, cancel) drops the rest of
its block, and its blocks are freed within that dispatch.

Bad requests (empty prompt, ids outside the vocabulary,
too long, invalid sampling parameters) end at once with finish_reason "error" and a message;
the others run on.

Hooks for serving and rollouts: `submit(..., on_token=f)` hands each token over as it is appended
(`TokenEvent`: id, log p, text delta from incremental detokenisation, finish reason);
`cancel(id)` ends a waiting or running request at once; `SamplingParams.n` samples one prompt n
times with one prefill (forked cache blocks, `scheduler.py`); the prefix cache (infer.prefix_cache)
prefills only what no earlier request has cached (`scheduler.py`; `prefix_cache_stats()`,
`Completion.cached_tokens`); `expert_load()` reads the tokens each MoE layer routed to each
expert (`expert_load.py`), `expert_ledger` the counts of each of the last experts.window_steps
steps (`runtime/expert_ledger.py`); `load_weights` swaps in new parameters
without recompiling (`Engine.from_program` builds an engine on a model program's mesh).

Records for post-training, per request: `SamplingParams.record_routing` keeps the experts each
MoE layer routed each computed position to (prefill chunks, prefix-cache blocks that carry
theirs, decode steps: the routed experts every step returns anyway, read back only for such
rows) as `Completion.routed_experts`, aligned with a trainer's input positions, for routing replay
(`Transformer.hidden(routed_experts=...)`); `SamplingParams.tempered_logprobs` keeps
log softmax(z / temperature)[token] of each generated token (`Completion.tempered_logprobs`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from omegaconf import OmegaConf
from tqdm import tqdm

from frontier_jax.convert import from_hf
from frontier_jax.data.tokenizer import Tokenizer, load_tokenizer, run_tokenizer
from frontier_jax.infer.cache import CacheLayout, allocate_cache, copy_blocks
from frontier_jax.infer.config import DecodeAttentionImpl, InferConfig, Speculative
from frontier_jax.infer.detokenize import TextStream
from frontier_jax.infer.expert_load import ExpertLoad, count_experts, empty_load
from frontier_jax.infer.expert_slots import logical_experts, place_experts, slot_arrays, slot_count
from frontier_jax.infer.sampling import (
    MAX_BANNED,
    SamplingParams,
    prompt_scores,
    sample,
    tempered_logprobs,
    top_logprobs,
)
from frontier_jax.infer.scheduler import (
    Completion,
    PrefixCacheStats,
    Request,
    Scheduler,
    StepBatch,
    TokenEvent,
)
from frontier_jax.infer.speculative import MTPDecoder, accept
from frontier_jax.infer.step import make_decode_step, make_decode_steps, make_step, pack_decode
from frontier_jax.infer.weights import swap_weights
from frontier_jax.model import Transformer
from frontier_jax.model.config import ImplConfig
from frontier_jax.model.latent_cache import Pages
from frontier_jax.model.moe import default_slots
from frontier_jax.model.routing import ExpertBias
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.expert import expert_parallel_size
from frontier_jax.parallel.host import fetch
from frontier_jax.parallel.mesh import state_shardings
from frontier_jax.parallel.placement import Placement
from frontier_jax.parallel.rules import DEFAULT_RULES, use_sharding
from frontier_jax.precision.config import PrecisionConfig
from frontier_jax.runtime.expert_ledger import ExpertLedger, ExpertsConfig
from frontier_jax.runtime.program import ModelProgram, ModelSections, inference_impl, model_program
from frontier_jax.runtime.restore import restore_params


@dataclasses.dataclass
class InFlight:
    """A dispatched decode step whose sampled tokens are not read back yet: tokens [R] and
    logprobs [B] of rows b < len(rows) (device arrays)."""

    rows: list[Request]
    tokens: jax.Array
    logprobs: jax.Array
    top: tuple[jax.Array, jax.Array]  # the rows' most likely ids and log-probs [B, min(MAX_LOGPROBS, V)]
    tempered: jax.Array | None  # [B] log softmax(z / temperature)[token], where a row asked for it
    experts: jax.Array | None  # [L_moe, B, 1, K] routed experts, counted (and recorded) at read-back


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
        experts: ExpertsConfig | None = None,
        verbose: bool = False,
        placement: Placement | None = None,
        planner: Callable[..., Placement] | None = None,
    ):
        """mesh, rules: parameters sharded by the logical-axis rules (default
        `parallel.rules.DEFAULT_RULES`), activations constrained by them, the cache replicated and
        every step's rows a multiple of the batch split; build `model` with the matching expert
        dispatcher (`parallel.expert.expert_dispatcher(mesh, rules)`).  None: one device.
        experts: the window of `expert_ledger` (experts.window_steps scheduler steps).

        placement (default: the file `infer.expert_placement`, if set): redundant experts, the
        MoE layers' experts run on its E + R physical slots (`set_placement`); `model` must be
        built with impl.expert_replicas=R on a mesh with an `expert` axis (`from_program` builds
        it so).  planner(load [L, E], replicas=R, devices=D) -> Placement re-plans every
        `infer.replan_every` steps (default `parallel.placement.plan`)."""
        self.cfg = model.cfg
        self.infer = (infer or InferConfig()).validate()
        if placement is None and self.infer.expert_placement:
            placement = Placement.load(self.infer.expert_placement)
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
        self.mesh, self.rules = mesh, dict(rules or DEFAULT_RULES)
        # every device array the steps carry is committed to its placement (as `load_weights`
        # places new parameters), so that each program compiles once whichever step made it
        if mesh is None:
            self.state = jax.tree.map(lambda x: jax.device_put(x, x.sharding), nnx.to_pure_dict(state))
            replicated, min_rows = jax.tree.leaves(self.state)[0].sharding, 1
        else:
            self.state = jax.device_put(nnx.to_pure_dict(state), state_shardings(state, mesh, self.rules))
            replicated = NamedSharding(mesh, PartitionSpec())
            min_rows = math.prod(mesh.shape[a] for a in self.rules["batch"] if a in mesh.shape)
        self.placement, self._planner = None, planner
        self._check_placement(placement)
        slots = slot_count(self.state)
        if slots is not None:  # store the slots' copies (the default placement unless one is given)
            default = default_slots(
                {
                    "physical_to_logical": np.zeros((self.cfg.num_moe_layers, slots)),
                    "copies": np.zeros((self.cfg.num_moe_layers, self.cfg.n_routed_experts)),
                }
            )
            self.set_placement(placement or Placement(**default))
        self.cache = jax.device_put(allocate_cache(self.cfg, self.layout, dtype), replicated)
        # this step's expert counts (device, None until a forward counts some) and the ledger
        # that each step's counts go to
        self._step_load: jax.Array | None = None
        self._step_tokens = 0
        self._load_sharding = replicated
        self.expert_ledger = ExpertLedger(
            self.cfg.num_moe_layers,
            self.cfg.n_routed_experts,
            (experts or ExpertsConfig()).validate().window_steps,
        )
        self._steps, self._load_at_plan = 0, None
        impl = DecodeAttentionImpl(self.infer.decode_attention_impl).value
        self._prefill = make_step(graphdef, absorbed=False)
        self._decode = make_step(graphdef, absorbed=True, impl=impl)
        self._decode_sample = make_decode_step(graphdef, impl=impl)
        self._decode_sample_tempered = make_decode_step(graphdef, impl=impl, tempered=True)
        # (steps, tempered=...) -> the program of that many decode steps per dispatch
        self._decode_steps = functools.partial(make_decode_steps, graphdef, impl=impl)
        self.scheduler = Scheduler(
            self.layout,
            self.infer.max_seqs,
            self.infer.prefill_chunk,
            min_rows,
            prefix_cache=self.infer.prefix_cache,
            draft_depth=self.layout.lookahead,
        )
        # `previous` with nothing in flight
        self._no_tokens = jax.device_put(jnp.zeros(self.scheduler.max_rows, jnp.int32), replicated)
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

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up in the prefix cache and tokens served from it since the
        engine was built (`scheduler.py`); hit rate = hit_tokens / queried_tokens."""
        return PrefixCacheStats(self.scheduler.queried_tokens, self.scheduler.hit_tokens)

    # ----------------------------------------------------------------------- loading
    @classmethod
    def from_program(
        cls,
        program: ModelProgram,
        params: dict,
        biases: dict,
        *,
        tokenizer: Tokenizer | None = None,
        infer: InferConfig | dict | None = None,
        placement: Placement | None = None,
        **kwargs,
    ) -> Engine:
        """An engine over `program`'s model holding `params` and `biases` (pure dicts: a train
        state's, `restore_params`'), on the program's mesh with its rules table and expert
        dispatcher (parameters laid out by the rules, activations constrained by them).  A
        program whose model has a scalar head (a reward / value model) has no tokens to generate:
        a one-line error.  placement (default: the file `infer.expert_placement`, if set):
        the model runs its experts on the placement's slots (impl.expert_replicas set to its R)."""
        head = str(getattr(program.cfg.model, "head", "lm"))
        if head != "lm":
            raise ValueError(
                f"model.head={head}: an Engine generates tokens from a language-model head (model.head=lm); "
                "score a scalar-head model with a forward pass instead"
            )
        infer = _infer_config(InferConfig(), infer)
        if placement is None and infer.expert_placement:
            placement = Placement.load(infer.expert_placement)
        if placement is not None and placement.replicas > 0:
            program = program.with_impl(program.cfg.impl.replace(expert_replicas=placement.replicas))
        return cls(
            program.model(params, biases),
            tokenizer=tokenizer,
            infer=infer,
            mesh=program.mesh,
            rules=program.rules,
            placement=placement,
            **kwargs,
        )

    @classmethod
    def from_hf(
        cls,
        path: str,
        *,
        dtype="float32",
        mesh=None,
        infer: InferConfig | dict | None = None,
        impl: Mapping | None = None,
        **kwargs,
    ) -> Engine:
        """An engine over the Hugging Face checkpoint directory `path` (`convert.from_hf`, onto
        `mesh` or one device), with its tokenizer.json when present; impl: impl.* choices
        (`runtime.program.inference_impl`)."""
        impl_config = inference_impl(ImplConfig(), impl)
        cfg, model = from_hf(path, dtype=dtype, mesh=mesh, impl=impl_config)
        sections = ModelSections(cfg, MeshConfig(), PrecisionConfig(model.policy.name), impl_config)
        program = model_program(sections, mesh)
        _, params, biases = nnx.split(model, nnx.Param, ExpertBias)
        tokenizer_file = Path(path) / "tokenizer.json"
        tokenizer = load_tokenizer(str(tokenizer_file)) if tokenizer_file.is_file() else None
        return cls.from_program(
            program,
            nnx.to_pure_dict(params),
            nnx.to_pure_dict(biases),
            tokenizer=tokenizer,
            infer=infer,
            **kwargs,
        )

    @classmethod
    def from_checkpoint(
        cls,
        run_dir: str,
        step: int | None = None,
        *,
        mesh=None,
        dtype=None,
        infer: InferConfig | dict | None = None,
        impl: Mapping | None = None,
        **kwargs,
    ) -> Engine:
        """An engine over a training run's checkpoint (latest step, or `step`, or the step of a
        checkpoints/STEP path): its parameters only (`runtime.restore.restore_params`, onto
        `mesh`: a Mesh, a MeshConfig or None for one device; floating parameters cast to
        `dtype`; dropless expert dispatch unless `impl` says otherwise), its config (the `infer`
        section updated by `infer`) and its tokenizer."""
        restored = restore_params(run_dir, step, mesh=mesh, dtype=dtype, impl=impl)
        saved = restored.config
        tokenizer = run_tokenizer(restored.config, restored.trained())
        saved_infer = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(InferConfig), saved.get("infer", {}))
        )
        return cls.from_program(
            restored.program,
            restored.params,
            restored.biases,
            tokenizer=tokenizer,
            infer=_infer_config(saved_infer, infer),
            **kwargs,
        )

    def load_weights(self, params: dict, biases: dict) -> None:
        """Swaps in new parameters and expert biases (pure dicts of the engine's model config,
        e.g. a trainer's state after an update, on any mesh and in any dtype): each array is
        cast to the dtype of the one it replaces and laid out with its sharding, so every
        compiled step runs on without recompiling (`weights.py`).  Refused while requests run
        (their cached latents come from the old weights): finish or `cancel` them first.
        Waiting requests stay queued and run on the new weights.  The prefix cache is flushed
        (its blocks hold latents of the old weights), so no latent of the old weights is read
        afterwards."""
        running = self.scheduler.running
        if running:
            raise RuntimeError(
                f"load_weights while {len(running)} requests run (ids {', '.join(str(r.id) for r in running[:4])}"
                f"{', ...' if len(running) > 4 else ''}): step until they finish or cancel them first"
            )
        if self.placement is None:
            self.state = swap_weights(self.state, params, biases)
        else:
            logical = swap_weights(logical_experts(self.state, self.placement), params, biases)
            flat = {**traverse_util.flatten_dict(logical), **slot_arrays(self.state)}
            self.state = place_experts(traverse_util.unflatten_dict(flat), self.placement, None)
        self.scheduler.alloc.flush()

    # ----------------------------------------------------------------------- expert placement
    def _check_placement(self, placement: Placement | None) -> None:
        """One-line ValueError where `placement` cannot run on this engine's model and mesh."""
        slots = slot_count(self.state)
        if placement is None:
            if self.infer.replan_every and slots is None:
                raise ValueError(
                    f"infer.replan_every={self.infer.replan_every} re-plans a placement of redundant experts "
                    "and there is none: give one (infer.expert_placement=FILE or placement=)"
                )
            return
        devices = 1 if self.mesh is None else expert_parallel_size(self.mesh, self.rules)
        if devices == 1:
            raise ValueError(
                "an expert placement needs expert parallelism: a mesh with an `expert` axis > 1 that the "
                "`expert` rule uses (mesh.expert=D); this engine has none"
            )
        if placement.replicas == 0:
            raise ValueError(
                "the placement has no redundant experts (0 replicas): plan it with replicas >= 1, or run "
                "without a placement"
            )
        placement.check_fits(self.cfg.num_moe_layers, self.cfg.n_routed_experts, devices)
        if placement.num_slots != slots:
            runs = "no replicas" if slots is None else f"{slots - self.cfg.n_routed_experts} replicas"
            raise ValueError(
                f"the placement has {placement.replicas} replicas per layer and the model runs {runs}: build "
                f"it with impl.expert_replicas={placement.replicas} (Engine.from_program does)"
            )

    def set_placement(self, placement: Placement) -> None:
        """Runs the MoE layers' experts on `placement`'s slots from the next step on: the expert
        weights are re-copied into the slots (`expert_slots.py`) with the same shapes, dtypes
        and shardings, so no step recompiles; the outputs stay the same (dropless dispatch).
        Its replica count must be the model's (impl.expert_replicas)."""
        self._check_placement(placement)
        self.state = place_experts(self.state, placement, self.placement)
        self.placement = placement

    def replan(self) -> Placement | None:
        """A placement planned from the expert loads counted since the last plan (`expert_load`)
        with this placement's replica count over the expert devices, applied with
        `set_placement`; None (nothing changed) when no token was counted since."""
        if self.placement is None:
            raise ValueError("replan: this engine runs no placement of redundant experts")
        load = self.expert_load().load.astype(np.float64)
        window = load - (0 if self._load_at_plan is None else self._load_at_plan)
        if (window < 0).any():  # the counts were reset since: all of them are new
            window = load
        self._load_at_plan = load
        if not window.any():
            return None
        if self._planner is None:
            from frontier_jax.parallel.placement import plan as planner
        else:
            planner = self._planner
        devices = expert_parallel_size(self.mesh, self.rules)
        placement = planner(window, replicas=self.placement.replicas, devices=devices)
        self.set_placement(placement)
        return placement

    # ----------------------------------------------------------------------- requests
    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> int:
        """Queues one request; returns its id.  With params.n > 1 it queues n samples of the
        prompt, ids id .. id + n - 1, prefilled once (`scheduler.py`); sample j draws with
        seed + j (params.seed, or the engine's seed + its id), so it equals a separate
        submission with that seed.  on_token(TokenEvent) is called with each generated token as
        it is appended (`TokenEvent`).  An invalid request is finished at once with
        finish_reason "error" (see `result`)."""
        params = params or SamplingParams()
        first = self._next_id
        samples = params.n if isinstance(params.n, int) and params.n > 0 else 1
        self._next_id += samples
        try:
            prompt_ids, stop_ids = self.check(prompt, params)
        except ValueError as err:
            ids = list(prompt) if not isinstance(prompt, str) else []
            for request_id in range(first, first + samples):
                self._done[request_id] = Completion(
                    ids, [], None, [], "error", f"request {request_id}: {err}"
                )
                if on_token is not None:
                    on_token(TokenEvent(request_id, None, None, None, "error"))
            return first
        budget = min(len(prompt_ids) + params.max_new_tokens, self.layout.max_len)
        group = [
            Request(
                first + j,
                prompt_ids,
                params,
                params.seed + j if params.seed is not None else self.seed + first + j,
                budget,
                stop_ids,
                TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None,
                on_token,
            )
            for j in range(params.n)
        ]
        leader, *followers = group
        leader.followers = followers
        for follower in followers:
            follower.leader = leader
        self.scheduler.add(leader)
        return first

    def check(self, prompt: str | Sequence[int], params: SamplingParams) -> tuple[list[int], frozenset[int]]:
        """Raises the ValueError that `submit` would end the request with (reads only the
        engine's configuration: safe from any thread); else (prompt ids, stop ids)."""
        params.check()
        self._check_records(params)
        prompt_ids = self._prompt_ids(prompt)
        self._check_samples(params, prompt_ids)
        return prompt_ids, self._stop_ids(params)

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The token ids that end a request: stop_token_ids and the tokenizer's eos (unless
        ignore_eos); raises ValueError where min_tokens cannot ban them all, or where the request
        asks speculative decoding for what it does not do (bans, log-prob alternatives)."""
        stop_ids = frozenset(params.stop_token_ids) | (
            {self.tokenizer.eos_id} if self.tokenizer is not None and not params.ignore_eos else set()
        )
        if params.min_tokens and len(stop_ids) > MAX_BANNED:
            raise ValueError(
                f"min_tokens={params.min_tokens} bans at most {MAX_BANNED} stop token ids and this request "
                f"has {len(stop_ids)} (stop_token_ids and eos): give fewer stop_token_ids"
            )
        if self._mtp is not None:
            asked = [name for name in ("min_tokens", "logprobs", "prompt_logprobs") if getattr(params, name)]
            if asked:
                raise ValueError(
                    f"{asked[0]}={getattr(params, asked[0])} with infer.speculative=mtp: speculative "
                    "decoding does not ban tokens nor report alternatives; use infer.speculative=none"
                )
        return stop_ids

    def _check_records(self, params: SamplingParams) -> None:
        """Raises ValueError where the request asks for a record this engine cannot keep."""
        asked = [name for name in ("record_routing", "tempered_logprobs") if getattr(params, name)]
        if asked and self._mtp is not None:
            raise ValueError(
                f"{asked[0]}=true with infer.speculative=mtp: speculative decoding verifies drafts it may "
                "reject, and keeps no per-token records; use infer.speculative=none"
            )
        if params.record_routing and not self.cfg.num_moe_layers:
            raise ValueError(
                "record_routing=true: this model has no MoE layers (model.num_layers == model.first_k_dense), "
                "so there is no routing to record; leave record_routing false"
            )

    def _check_samples(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        """Raises ValueError where n samples of the prompt can never run together."""
        if params.n == 1:
            return
        if self._mtp is not None:
            raise ValueError(
                f"n={params.n} samples with infer.speculative=mtp: the MTP drafts of forked samples would "
                "write their shared prompt blocks; submit the samples separately or use infer.speculative=none"
            )
        if params.n > self.infer.max_seqs:
            raise ValueError(f"n={params.n} samples exceed infer.max_seqs={self.infer.max_seqs} decode slots")
        budget = min(len(prompt_ids) + params.max_new_tokens, self.layout.max_len)
        needed = self.scheduler.group_blocks(len(prompt_ids), budget, params.n)
        pool = self.layout.num_blocks - 1
        if needed > pool:
            raise ValueError(
                f"n={params.n} samples need {needed} cache blocks and the cache holds {pool}: lower n or "
                "max_new_tokens, or raise infer.memory_budget_gb"
            )

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

    def cancel(self, request_id: int) -> bool:
        """Ends request `request_id` at once if it is waiting or running: finish_reason
        "cancelled" (its tokens and text so far kept), its decode slot and cache blocks freed;
        the other requests run on unchanged.  False if it has already finished."""
        if not 0 <= request_id < self._next_id:
            raise ValueError(f"cancel: no request {request_id} was submitted (ids 0 .. {self._next_id - 1})")
        request = next((r for r in self._requests() if r.id == request_id), None)
        if request is None:
            return False
        self.scheduler.remove(request)
        self._finish(request, "cancelled", None)
        if self._in_flight is not None and all(r.finish_reason for r in self._in_flight.rows):
            self._in_flight = None  # nothing of it is read: its rows' tokens would all be dropped
        return True

    def _requests(self):
        """Every waiting or running request, followers of waiting ones included."""
        for request in self.scheduler.waiting:
            yield from request.group
        yield from self.scheduler.running

    def expert_load(self, *, reset: bool = False) -> ExpertLoad:
        """Tokens each MoE layer routed to each expert in this engine's forwards since it was
        built (or last reset): `ExpertLoad(load [L_moe, N_r] assignments, tokens counted)`
        (`expert_load.py`); a decode step still in flight is counted once read back.  The last
        experts.window_steps steps of it: `expert_ledger.window()`; reset clears both."""
        if not self.cfg.num_moe_layers:
            raise ValueError(
                "expert_load: this model has no MoE layers (model.num_layers == model.first_k_dense)"
            )
        load = self.expert_ledger.total()
        if reset:
            self.expert_ledger.reset()
        return load

    def _count_experts(self, experts: jax.Array | None, counted: np.ndarray) -> None:
        """Adds the loads of a forward's routed experts (None: no MoE layer) at its `counted`
        [B, T] positions to this step's counts."""
        if experts is not None and counted.any():
            if self._step_load is None:
                self._step_load = empty_load(
                    self.cfg.num_moe_layers, self.cfg.n_routed_experts, self._load_sharding
                )
            self._step_load = count_experts(self._step_load, experts, jnp.asarray(counted))
            self._step_tokens += int(counted.sum())

    def _record_expert_step(self) -> None:
        """This step's expert counts into the ledger (a step that counted nothing adds none)."""
        if self._step_load is not None:
            self.expert_ledger.record(self._step_load, self._step_tokens)
            self._step_load, self._step_tokens = None, 0

    # ----------------------------------------------------------------------- stepping
    def step(self) -> list[int]:
        """One scheduler iteration (module docstring); returns the ids of requests finished in it."""
        try:
            if self.mesh is None:
                finished = self._step()
            else:
                with use_sharding(self.mesh, self.rules):
                    finished = self._step()
        finally:
            self._record_expert_step()
        self._steps += 1
        if self.infer.replan_every and self._steps % self.infer.replan_every == 0:
            self.replan()
        return finished

    def _step(self) -> list[int]:
        sched = self.scheduler
        sched.admit()
        finished = []
        start = time.perf_counter()
        scored = any(r.params.prompt_logprobs is not None for r in sched.running if r.prefilling)
        all_positions = self._mtp is not None or scored
        batch = sched.prefill_batch(all_positions=all_positions)
        if batch is not None:
            counts = batch.write.sum(1)
            starts = batch.positions[:, 0].copy()
            logits, hidden, experts = self._forward(self._prefill, batch)
            self.stats["prompt_tokens"] += int(counts.sum())
            self._record_routing(batch.rows, experts, counts)
            for request in batch.rows:
                sched.register(request)
            if all_positions:
                if self._mtp is not None:
                    self._keep_hidden(batch.rows, starts, hidden, counts)
                if scored:
                    self._score_prompts(batch.rows, starts, counts, logits)
                logits = logits[jnp.arange(logits.shape[0]), jnp.asarray(np.maximum(counts - 1, 0))]
            else:
                logits = logits[:, 0]
            prefilled = [b for b, r in enumerate(batch.rows) if not r.prefilling]
            followers, rows = self._fork([batch.rows[b] for b in prefilled], prefilled)
            finished += self._sample(batch.rows, logits, prefilled)
            if followers:
                picked = np.zeros(sched.rows_for(len(followers)), np.int32)
                picked[: len(rows)] = rows
                finished += self._sample(followers, logits[jnp.asarray(picked)], range(len(followers)))
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

    def _score_prompts(self, rows: list[Request], starts, counts, logits: jax.Array) -> None:
        """Appends log p(prompt_{p+1} | prompt_<=p) and its alternatives (`Completion.prompt_logprobs`)
        for each position p of this prefill chunk (logits [B, W, V] at every position) to the rows
        that ask for them."""
        targets = np.zeros(logits.shape[:2], np.int32)
        for b, request in enumerate(rows):
            following = request.prompt_ids[int(starts[b]) + 1 : int(starts[b]) + int(counts[b]) + 1]
            targets[b, : len(following)] = following
        chosen, top_ids, top_values = fetch(prompt_scores(logits, jnp.asarray(targets)))
        for b, request in enumerate(rows):
            k = request.params.prompt_logprobs
            if k is None:
                continue
            if request.prompt_logprobs is None:
                request.prompt_logprobs = [None]
            start = int(starts[b])
            for t in range(min(int(counts[b]), len(request.prompt_ids) - start - 1)):
                top = list(zip(top_ids[b, t, :k].tolist(), top_values[b, t, :k].tolist()))
                request.prompt_logprobs.append((float(chosen[b, t]), top))

    def _fork(self, prefilled: list[Request], rows: list[int]) -> tuple[list[Request], list[int]]:
        """Hands the prompt of each request in `prefilled` (its prefill just ended, its logits
        at batch row rows[i]) to its followers (`Scheduler.fork`) -> (the followers, the logits
        row each samples its first token from)."""
        followers, picked, copies = [], [], []
        for request, row in zip(prefilled, rows):
            forked, copied = self.scheduler.fork(request)
            for follower in forked:
                follower.prompt_logprobs = request.prompt_logprobs
            followers += forked
            picked += [row] * len(forked)
            copies += copied
        if copies:
            src, dst = np.asarray(copies, np.int32).T
            self.cache = copy_blocks(self.cache, jnp.asarray(src), jnp.asarray(dst))
        return followers, picked

    def _count_decode(self, rows: list[Request], steps: int = 1) -> None:
        self.stats["decode_steps"] += steps
        # cached tokens the steps read
        self.stats["decode_context"] += sum(steps * r.computed + steps * (steps - 1) // 2 for r in rows)

    def _decode_step(self, rows: list[Request]) -> list[int]:
        """Dispatches a decode step of the decoding `rows`, then reads back the step in flight
        before it (asynchronous) or this one (synchronous); returns the finished ids.  With
        infer.decode_steps_per_dispatch > 1: `_decode_steps_block`."""
        if self.infer.decode_steps_per_dispatch > 1:
            return self._decode_steps_block(rows) if rows else []
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
            [self._banned(r, len(r.output_ids) + (r.id in waiting)) for r in rows],
            sched.table(rows, [r.computed + 1 for r in rows], n),
            [r.params.min_tokens for r in rows],
        )
        previous_tokens = previous.tokens if previous else self._no_tokens
        asks_tempered = any(r.params.tempered_logprobs for r in rows)
        step = self._decode_sample_tempered if asks_tempered else self._decode_sample
        tokens, logprobs, *top, tempered, self.cache, experts = step(
            self.state, self.cache, previous_tokens, jnp.asarray(packed)
        )
        recorded = [tempered] if tempered is not None else []
        if experts is not None and any(r.params.record_routing for r in rows):
            recorded.append(experts)
        for array in (tokens, logprobs, *top, *recorded):
            array.copy_to_host_async()
        self.stats["forwards"] += 1
        for request in rows:
            request.computed += 1
        return InFlight(rows, tokens, logprobs, tuple(top), tempered, experts)

    def _decode_steps_block(self, rows: list[Request]) -> list[int]:
        """n decode steps of the decoding `rows` in one dispatch (`step.make_decode_steps`; n =
        infer.decode_steps_per_dispatch, or the power of two >= the largest m below when that is
        smaller), synchronously: each row takes at most its remaining
        m = min(max_new_tokens - generated, cache budget - length) tokens, its block table covers
        positions < computed + min(n, m); then tokens [n, B] (and logprobs, top log-probs,
        tempered log-probs [n, B] and routed experts [n, L_moe, B, 1, K_r] where rows ask for
        them) come back in one transfer and are appended step by step through `_append` (stop
        strings, on_token in bursts of up to n, finish reasons, retire); a row that ends drops
        the rest of its tokens, which are neither counted in the expert loads nor recorded.
        Returns the finished ids."""
        limits = [min(r.params.max_new_tokens - len(r.output_ids), r.budget - r.length) for r in rows]
        # fewer steps when no row may take n tokens: the power of two >= the largest limit
        n = min(self.infer.decode_steps_per_dispatch, 1 << (max(limits) - 1).bit_length())
        self._count_decode(rows, n)
        sched = self.scheduler
        width = sched.rows_for(len(rows))
        packed = pack_decode(
            width,
            [r.output_ids[-1] for r in rows],
            [-1] * len(rows),
            [r.computed for r in rows],
            [r.params for r in rows],
            [r.seed for r in rows],
            [len(r.output_ids) for r in rows],
            [self._banned(r, len(r.output_ids)) for r in rows],
            sched.table(rows, [r.computed + min(n, m) for r, m in zip(rows, limits)], width),
            [r.params.min_tokens for r in rows],
            limits,
            [sorted(r.stop_ids) for r in rows],
        )
        asks_tempered = any(r.params.tempered_logprobs for r in rows)
        tokens, logprobs, *top, tempered, self.cache, experts = self._decode_steps(n, tempered=asks_tempered)(
            self.state, self.cache, self._no_tokens, jnp.asarray(packed)
        )
        self.stats["forwards"] += n
        recording = experts is not None and any(r.params.record_routing for r in rows)
        tokens, logprobs, top, tempered, recorded = fetch(
            (
                tokens,
                logprobs,
                tuple(top),
                tempered if asks_tempered else None,
                experts if recording else None,
            )
        )
        appended = np.zeros((width, n), bool)
        finished = []
        for i in range(n):
            if recorded is not None:
                self._record_routing(rows, recorded[i])
            values = self._tempered(rows, None if tempered is None else tempered[i])
            for b, r in enumerate(rows):
                if r.finish_reason is not None:
                    continue
                appended[b, i] = True
                r.computed += 1
                if self._append(
                    r, int(tokens[i, b]), float(logprobs[i, b]), (top[0][i, b], top[1][i, b]), values[b]
                ):
                    finished.append(r.id)
        if experts is not None:
            self._count_experts(jnp.transpose(experts[:, :, :, 0], (1, 2, 0, 3)), appended)
        return finished

    def _read_back(self, step: InFlight) -> list[int]:
        """Appends `step`'s tokens (one transfer) to its rows that are still running; a row
        finished meanwhile drops its token (and is not counted in the expert loads).  Returns
        the ids finished now."""
        tokens, logprobs, (top_ids, top_values) = fetch((step.tokens, step.logprobs, step.top))
        running = [r.finish_reason is None for r in step.rows]
        if step.experts is not None:
            counted = np.zeros(step.experts.shape[1:3], bool)
            counted[: len(running), 0] = running
            self._count_experts(step.experts, counted)
            self._record_routing(step.rows, step.experts)
        tempered = self._tempered(step.rows, step.tempered)
        return [
            r.id
            for b, r in enumerate(step.rows)
            if self._append(r, int(tokens[b]), float(logprobs[b]), (top_ids[b], top_values[b]), tempered[b])
        ]

    def _forward(self, step, batch: StepBatch) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Runs `step` on `batch`, advances each row's cached length, counts its expert loads;
        (logits, hidden, routed experts [L_moe, B, T, K] or None)."""
        pages = Pages(jnp.asarray(batch.block_table), jnp.asarray(batch.write))
        logits, hidden, self.cache, experts = step(
            self.state,
            self.cache,
            jnp.asarray(batch.ids),
            jnp.asarray(batch.positions),
            pages,
            jnp.asarray(batch.select),
        )
        self._count_experts(experts, batch.write)
        self.stats["forwards"] += 1
        for request, count in zip(batch.rows, batch.write.sum(1)):
            request.computed += int(count)
        return logits, hidden, experts

    @staticmethod
    def _record_routing(rows: list[Request], experts: jax.Array | None, counts=None) -> None:
        """Appends to each row b of `rows` that records its routing (a running request) the
        experts [L_moe, B, T, K] of its first counts[b] positions (all T without counts), read
        back only when some row records (`Request.routing`)."""
        recording = [b for b, r in enumerate(rows) if r.params.record_routing and r.finish_reason is None]
        if experts is None or not recording:
            return
        experts = np.asarray(fetch(experts), np.int32)
        for b in recording:
            n = experts.shape[2] if counts is None else int(counts[b])
            rows[b].routing.append(experts[:, b, :n].transpose(1, 0, 2))

    @staticmethod
    def _tempered(rows: list[Request], tempered: jax.Array) -> list[float | None]:
        """log softmax(z / temperature)[token] [B] of the rows that ask for it, read back only
        then; None for the others."""
        if not any(r.params.tempered_logprobs for r in rows):
            return [None] * len(rows)
        values = fetch(tempered)
        return [float(values[b]) if r.params.tempered_logprobs else None for b, r in enumerate(rows)]

    @staticmethod
    def _keep_hidden(rows: list[Request], starts, hidden: jax.Array, counts) -> None:
        """Stores g^0 of the first counts[b] positions of each row (the MTP drafts read them)."""
        hidden = np.asarray(fetch(hidden), np.float32)
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

    @staticmethod
    def _banned(request: Request, generated: int) -> list[int]:
        """The ids `request` may not pick as its token number `generated`: its stop ids while
        fewer than min_tokens tokens are generated (`sampling.py`)."""
        return sorted(request.stop_ids) if generated < request.params.min_tokens else []

    def _speculative_step(self, rows: list[Request]) -> list[int]:
        """Draft, verify, accept and roll back (`speculative.py`) for every decoding request."""
        drafts, self.cache = self._mtp.draft(self.state, self.cache, rows)
        batch = self.scheduler.decode_batch(rows, drafts.tolist())
        lengths = [r.length for r in rows]
        logits, hidden, _ = self._forward(self._decode, batch)
        n = logits.shape[0]
        padded = np.zeros((n, drafts.shape[1]), np.int32)
        padded[: len(rows)] = drafts
        kept, tokens, logprobs = accept(logits, jnp.asarray(padded), *self._sampling_arrays(rows, n))
        kept, tokens, logprobs = fetch((kept, tokens, logprobs))
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

    def _sample(self, requests: list[Request], logits: jax.Array, rows) -> list[int]:
        """Samples the next token of requests[b] from logits[b] ([n, V], n >= len(requests))
        and appends it for b in `rows`; returns the finished ids."""
        if not rows:
            return []
        banned = np.full((logits.shape[0], MAX_BANNED), -1, np.int32)
        for b, request in enumerate(requests):
            ids = self._banned(request, len(request.output_ids))
            banned[b, : len(ids)] = ids
        arrays = self._sampling_arrays(requests, logits.shape[0])
        tokens, logprobs = sample(logits, *arrays, jnp.asarray(banned))
        tempered = [None] * len(requests)
        if any(r.params.tempered_logprobs for r in requests):
            tempered = self._tempered(requests, tempered_logprobs(logits, arrays[0], tokens))
        tokens, logprobs, (top_ids, top_values) = fetch((tokens, logprobs, top_logprobs(logits)))
        return [
            requests[b].id
            for b in rows
            if self._append(
                requests[b], int(tokens[b]), float(logprobs[b]), (top_ids[b], top_values[b]), tempered[b]
            )
        ]

    def _append(
        self,
        request: Request,
        token: int,
        logprob: float,
        top: tuple | None = None,
        tempered: float | None = None,
    ) -> bool:
        """Adds a generated token (top: the most likely ids and log-probs of its distribution,
        kept with params.logprobs; tempered: its log-probability at the request's temperature,
        kept with params.tempered_logprobs), hands it over (`on_token`); finishes and retires the
        request when it ends.  A request that has ended already (a stop in an earlier step,
        `cancel`) drops the token."""
        if request.finish_reason is not None:
            return False
        request.output_ids.append(token)
        request.logprobs.append(logprob)
        if request.params.tempered_logprobs:
            request.tempered_logprobs.append(tempered)
        k = request.params.logprobs
        alternatives = list(zip(top[0][:k].tolist(), top[1][:k].tolist())) if k and top is not None else None
        if alternatives is not None:
            request.top_logprobs.append(alternatives)
        self.stats["generated_tokens"] += 1
        text = None if request.stream is None else ""
        if token in request.stop_ids:
            request.finish_reason = "stop"
        elif request.stream is not None:
            text, stopped = request.stream.push(token)
            request.finish_reason = "stop" if stopped else None
        if request.finish_reason is None and request.reaches_limit():
            request.finish_reason = "length"
        if request.finish_reason is None:
            if request.on_token is not None:
                request.on_token(self._event(request, token, logprob, text, None, alternatives))
            return False
        self.scheduler.retire(request)
        self._finish(request, request.finish_reason, (token, logprob, text, alternatives))
        return True

    @staticmethod
    def _event(request: Request, token, logprob, text, reason, alternatives) -> TokenEvent:
        first = len(request.output_ids) == 1 and token is not None
        prompt = request.prompt_logprobs if first else None
        cached = request.cached_tokens if first else None
        return TokenEvent(request.id, token, logprob, text, reason, alternatives, prompt, cached)

    def _finish(self, request: Request, reason: str, last: tuple | None) -> None:
        """Records `request` as ended for `reason` (its text completed) and hands over its last
        event: the token `last` = (id, logprob, text so far of the delta, alternatives), or none."""
        token, logprob, text, alternatives = last or (
            None,
            None,
            None if request.stream is None else "",
            None,
        )
        if request.stream is not None:
            text += request.stream.finish()
            request.text = request.stream.text
        request.finish_reason = reason
        self._done[request.id] = request.completion()
        if request.on_token is not None:
            request.on_token(self._event(request, token, logprob, text, reason, alternatives))

    # ----------------------------------------------------------------------- batch API
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
        on_finish: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Runs every prompt to completion (continuous batching); completions in prompt order,
        the n samples of a prompt (`SamplingParams.n`) one after another.  `on_finish(k,
        completion)` is called as the k-th of those completions finishes (in finishing order)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        ids, total = [], 0
        for prompt, p in zip(prompts, params):
            first = self.submit(prompt, p)
            ids += range(first, self._next_id)
            total += 0 if first in self._done else p.max_new_tokens * p.n
        index = {request_id: k for k, request_id in enumerate(ids)}

        def report(finished) -> None:
            for request_id in finished:
                if on_finish is not None and request_id in index:
                    on_finish(index[request_id], self._done[request_id])

        report([i for i in ids if i in self._done])  # invalid requests, finished at submission
        with tqdm(total=total, unit="tok", desc="generate", disable=not progress) as bar:
            while not self.scheduler.idle:
                before = self.stats["generated_tokens"]
                report(self.step())
                bar.update(self.stats["generated_tokens"] - before)
        return [self._done.pop(i) for i in ids]
