"""Continuous batching: requests wait in a queue, are admitted into decode slots between
steps while the cache has room, advance one prefill chunk or one decoded token per step, and
retire (freeing their blocks) as soon as they finish.

Admission reserves the blocks of a request's whole budget (prompt + max_new_tokens, at most
infer.max_len, plus the layout's lookahead: the draft positions a speculative verification
writes past the last kept token), so a running request never waits for memory and nothing is preempted; a
request that does not fit yet waits until retirements free enough blocks.

Forked samples (`SamplingParams.n`): the n samples of one prompt are admitted together; the
first (the leader) prefills the prompt, the others (its followers) wait in their slots with
blocks of their own for all but the F = floor(prompt / P) full prompt blocks: n ceil(budget / P)
- (n - 1) F blocks instead of n ceil(budget / P).  When the leader's prefill ends, `fork` hands
each follower the prompt: the leader's F full blocks, shared (reference-counted, only read from
then on), and a copy of its partly filled last prompt block in the follower's own block at that
index (`cache.copy_blocks`), so a block is written only while one sequence holds it; each sample
then decodes on its own.  A leader cancelled before its prefill ends hands the prefill and its
full prompt blocks on to its first follower.

Prefix caching (infer.prefix_cache): every full block whose latents are final is keyed by the
hash chain of the tokens from position 0 to its end (`cache.chain_keys`: a cryptographic hash,
so equal keys mean equal prefixes), after each prefill chunk and when its sequence retires
(generated tokens included).  Admission looks up the longest keyed prefix of a prompt's full
blocks, takes those blocks reference-counted (read only: positions below `computed` are never
written again) and prefills only the rest.  At most floor((prompt - 1) / P) blocks are reused,
so the last prompt token is always computed again: its logits give the first token (and with MTP
its hidden state g^0 feeds the drafts).  With MTP drafting the MTP latents of a block's last
positions depend on the D tokens after it (depth k at j reads t_{j+k}), so a block is reused
only when its MTP latents are final (keyed with that tail when its sequence retires) and its
tail equals the prompt's next D tokens; the drafts then start at the first position prefilled.
Released keyed blocks stay cached until the allocator needs their space, least recently used
first (`cache.BlockAllocator`).

Routing records (`SamplingParams.record_routing`): a request keeps the experts each MoE layer
routed each of its computed positions to (`Request.routing`); the blocks it keys carry their
share, and a recording request reuses only cached blocks that carry it (their routing is then
the one their latents were computed with); followers get the prompt's routing with its blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from frontier_jax.infer.cache import BlockAllocator, CacheLayout, chain_keys
from frontier_jax.infer.detokenize import TextStream
from frontier_jax.infer.sampling import SamplingParams


@dataclass
class Completion:
    """The result of one request: prompt and generated token ids, the generated text (stop
    string excluded), log p_model of each generated token, and why it ended: "stop" (stop
    token or string), "length" (max_new_tokens or infer.max_len), "cancelled" (`Engine.cancel`)
    or "error" (see `error`); cached_tokens: the prompt tokens whose latents came from the
    prefix cache instead of a prefill (the same for the n samples of a prompt).  With
    `SamplingParams.logprobs` = k: top_logprobs[i], the k most likely (id, log p) of generated
    token i; with prompt_logprobs = k: prompt_logprobs[i], None for i = 0, else
    (log p(prompt_i | prompt_<i), the k most likely (id, log p) there).

    With record_routing: routed_experts [S - 1, L_moe, K] int32 (S = len(prompt_ids) +
    len(output_ids)), row i the K experts each MoE layer (model order) routed token i of
    prompt_ids + output_ids to in the forward that computed its latent (prefill, prefix-cache
    block or decode step): the positions of a trainer's input_ids = (prompt_ids + output_ids)[:-1],
    whose targets are the tokens after them (the last token is never fed to the model); None where
    no position was computed (an error, a cancel before any forward).  With tempered_logprobs:
    tempered_logprobs[i] = log softmax(z_i / temperature)[output_ids[i]] (`sampling.py`)."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    logprobs: list[float]
    finish_reason: str
    error: str | None = None
    cached_tokens: int = 0
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list | None = None
    routed_experts: np.ndarray | None = field(default=None, compare=False)  # equality: compare the arrays
    tempered_logprobs: list[float] | None = None


@dataclass(frozen=True)
class TokenEvent:
    """What `Engine.submit(on_token=...)` hands over for each generated token of request
    `request_id`: the token id, log p_model(token), the text it adds (None without a
    tokenizer; text that might start a stop string comes with a later token, `detokenize.py`)
    and the finish reason when the request ends with it.  A request that ends without a new
    token (an invalid request, `Engine.cancel`) hands over one event with token None.
    top_logprobs: the token's `Completion.top_logprobs` entry (SamplingParams.logprobs > 0);
    prompt_logprobs: `Completion.prompt_logprobs`, with the first token only; cached_tokens:
    `Completion.cached_tokens`, with the first token only."""

    request_id: int
    token: int | None
    logprob: float | None
    text: str | None
    finish_reason: str | None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list | None = None
    cached_tokens: int | None = None


@dataclass(eq=False)  # one request is equal only to itself
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    budget: int  # tokens the request may occupy in the cache: prompt + generation
    stop_ids: frozenset[int] = frozenset()  # token ids that end the generation
    stream: TextStream | None = None  # the generated text (None without a tokenizer)
    on_token: Callable[[TokenEvent], None] | None = None
    leader: Request | None = None  # the sample that prefills this follower's prompt (`fork`)
    followers: list[Request] = field(default_factory=list)  # samples waiting for this prefill
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with params.logprobs
    prompt_logprobs: list | None = None  # with params.prompt_logprobs (`Completion`)
    tempered_logprobs: list[float] = field(default_factory=list)  # with params.tempered_logprobs
    routing: list[np.ndarray] = field(
        default_factory=list
    )  # with params.record_routing: [n, L_moe, K] pieces
    computed: int = 0  # leading tokens whose latent is in the cache
    mtp_computed: int = 0  # speculative decoding: leading positions final in every MTP cache
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # g^0 of positions >= mtp_computed
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its leading full blocks
    registered: int = 0  # leading blocks keyed in the prefix cache (by it or before it)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: str | None = None
    text: str | None = None

    @property
    def length(self) -> int:
        """Tokens of the sequence, prompt + generated (no list is built: host work per decode
        step stays O(1) per row however long the prompt)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens_from(self, start: int) -> list[int]:
        """(prompt_ids + output_ids)[start:], copying only that tail (decode steps need the last few tokens of a
        sequence whose prompt may hold thousands)."""
        prompt = len(self.prompt_ids)
        if start >= prompt:
            return self.output_ids[start - prompt :]
        return self.prompt_ids[start:] + self.output_ids

    def reaches_limit(self, more: int = 0) -> bool:
        """Whether the request is at max_new_tokens or its cache budget once `more` further
        tokens are generated."""
        return len(self.output_ids) + more >= self.params.max_new_tokens or self.length + more >= self.budget

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt_ids)

    @property
    def group(self) -> list[Request]:
        """This request and the followers admitted with it."""
        return [self, *self.followers]

    def routed_experts(self, start: int = 0) -> np.ndarray | None:
        """The recorded routing of positions start, start + 1, .. (every recorded one)
        [n, L_moe, K] int32, None where none is recorded; only the pieces from `start` on are
        joined (keying each prefill chunk's blocks stays linear in the prompt)."""
        if not self.routing:
            return None
        end = sum(len(piece) for piece in self.routing)
        first, tail = end, []
        for piece in reversed(self.routing):
            if first <= start:
                break
            first -= len(piece)
            tail.append(piece)
        if not tail:
            return self.routing[-1][:0]
        joined = tail[0] if len(tail) == 1 else np.concatenate(tail[::-1])
        return joined[start - first :]

    def completion(self) -> Completion:
        return Completion(
            self.prompt_ids,
            self.output_ids,
            self.text,
            self.logprobs,
            self.finish_reason,
            cached_tokens=self.cached_tokens,
            top_logprobs=self.top_logprobs if self.params.logprobs else None,
            prompt_logprobs=self.prompt_logprobs,
            routed_experts=self.routed_experts() if self.params.record_routing else None,
            tempered_logprobs=self.tempered_logprobs if self.params.tempered_logprobs else None,
        )


@dataclass(frozen=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache (every admitted prompt, once for n samples)
    and those served from it; both 0 with infer.prefix_cache off."""

    queried_tokens: int
    hit_tokens: int


@dataclass
class StepBatch:
    """One step's host arrays: ids, positions, write [B, T]; block table [B, M]; select [B, K]
    (positions whose logits are returned); rows: the requests of the first len(rows) rows."""

    ids: np.ndarray
    positions: np.ndarray
    write: np.ndarray
    block_table: np.ndarray
    select: np.ndarray
    rows: list[Request]


def bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most cap: steps compile once per bucket."""
    return min(1 << max(n - 1, 0).bit_length(), cap)


class Scheduler:
    def __init__(
        self,
        layout: CacheLayout,
        max_seqs: int,
        prefill_chunk: int,
        min_rows: int = 1,
        *,
        prefix_cache: bool = False,
        draft_depth: int = 0,
    ):
        """min_rows: the fewest rows of a step (the ways the batch is split over a mesh);
        prefix_cache: reuse cached prefixes (module docstring); draft_depth: D, the MTP drafts
        of a speculative engine (0: none)."""
        self.layout, self.max_seqs, self.prefill_chunk = layout, max_seqs, prefill_chunk
        self.min_rows = min_rows
        self.prefix_cache, self.draft_depth = prefix_cache, draft_depth
        self.queried_tokens = self.hit_tokens = 0
        self.alloc = BlockAllocator(layout)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, request: Request) -> None:
        """Queues `request` with its followers (`Request.followers`), admitted together."""
        self.waiting.append(request)

    def group_blocks(self, prompt: int, budget: int, samples: int) -> int:
        """Blocks that `samples` forked samples of a `prompt`-token prompt with a cache budget of
        `budget` tokens each take: the shared full prompt blocks once."""
        own = self.alloc.blocks_for(budget + self.layout.lookahead)
        return own + (samples - 1) * (own - prompt // self.layout.block_size)

    def shared_blocks(self, request: Request) -> int:
        """The full prompt blocks that forked samples share: floor(prompt / P)."""
        return len(request.prompt_ids) // self.layout.block_size

    def admit(self) -> None:
        """Moves waiting requests (with their followers) into free decode slots, first come
        first served."""
        while self.waiting and len(self.running) + len(self.waiting[0].group) <= self.max_seqs:
            request = self.waiting[0]
            hits = self.lookup(request)
            needed = self.group_blocks(len(request.prompt_ids), request.budget, len(request.group))
            if needed - len(hits) + self.alloc.evictable(hits) > self.alloc.free_blocks:
                return
            tokens = request.budget + self.layout.lookahead
            self.alloc.adopt(request.id, hits)
            self.alloc.reserve(request.id, tokens)
            for follower in request.followers:
                self.alloc.reserve(follower.id, tokens, shared=self.shared_blocks(request))
            if self.prefix_cache:
                cached = len(hits) * self.layout.block_size
                self.queried_tokens += len(request.prompt_ids)
                self.hit_tokens += cached
                request.computed = request.mtp_computed = cached
                request.registered = len(hits)
                if hits and request.params.record_routing:
                    request.routing = [self.alloc.routing(hits)]
                for sample in request.group:
                    sample.cached_tokens = cached
            self.running += self.waiting.popleft().group

    def lookup(self, request: Request) -> list[int]:
        """The cached blocks of the longest keyed prefix of `request`'s prompt: at most
        floor((prompt - max(1, D)) / P) blocks (the last prompt token computed again; with MTP
        drafting each block's tail of D tokens inside the prompt and equal to its cached tail).
        None (no block) for a request that asks for prompt log-probabilities: every prompt position
        of it is computed, so that each has its scores; for one that records its routing only
        blocks that carry theirs."""
        if not self.prefix_cache or request.params.prompt_logprobs is not None:
            return []
        size, depth, prompt = self.layout.block_size, self.draft_depth, request.prompt_ids
        n = (len(prompt) - max(1, depth)) // size
        tails = [tuple(prompt[(i + 1) * size : (i + 1) * size + depth]) for i in range(n)] if depth else None
        return self.alloc.lookup(self.keys(request, n), tails, routed=request.params.record_routing)

    def keys(self, request: Request, n: int) -> list[bytes]:
        """The prefix-cache keys of `request`'s first n full blocks (hashed once, kept)."""
        have, size = len(request.keys), self.layout.block_size
        if n > have:
            tokens = request.tokens_from(have * size)[: (n - have) * size]
            request.keys += chain_keys(request.keys[-1] if have else b"", tokens, size)
        return request.keys[:n]

    def register(self, request: Request) -> None:
        """Keys `request`'s full blocks whose latents are final (positions < computed, their
        tokens known) in the prefix cache."""
        if not self.prefix_cache:
            return
        size = self.layout.block_size
        n = min(request.computed, request.length) // size
        if n > request.registered:
            routing = None
            if request.params.record_routing:  # blocks whose every position's routing is recorded
                start = request.registered * size
                routed = request.routed_experts(start)
                recorded = start + (0 if routed is None else len(routed))
                routing = [
                    routed[i * size - start : (i + 1) * size - start].copy()
                    if (i + 1) * size <= recorded
                    else None
                    for i in range(request.registered, n)
                ]
            self.alloc.register(
                request.id, self.keys(request, n)[request.registered :], request.registered, routing=routing
            )
            request.registered = n

    def register_tails(self, request: Request) -> None:
        """With MTP drafting: gives `request`'s own keyed blocks whose MTP latents are final
        (positions < mtp_computed, their D next tokens known) those tails."""
        size, depth = self.layout.block_size, self.draft_depth
        first = request.cached_tokens // size  # the blocks before came with their tails
        n = min(request.mtp_computed, request.computed, request.length - depth) // size
        if n > first:
            tokens = request.tokens_from(0)
            tails = [tuple(tokens[(i + 1) * size : (i + 1) * size + depth]) for i in range(first, n)]
            self.alloc.register(request.id, self.keys(request, n)[first:], first, tails)

    def fork(self, request: Request) -> tuple[list[Request], list[tuple[int, int]]]:
        """The followers of `request`, whose prefill just ended, get its prompt: (followers,
        (source, destination) blocks to copy: the partly filled last prompt block)."""
        followers, request.followers = request.followers, []
        shared, copies = self.shared_blocks(request), []
        for follower in followers:
            follower.leader, follower.computed = None, request.computed
            follower.keys, follower.registered = request.keys[:shared], min(request.registered, shared)
            follower.routing = list(request.routing)  # the prompt's, shared (never written)
            self.alloc.share(request.id, follower.id, shared)
            if len(request.prompt_ids) % self.layout.block_size:
                copies.append((self.alloc.blocks(request.id)[shared], self.alloc.blocks(follower.id)[shared]))
        return followers, copies

    def remove(self, request: Request) -> None:
        """Takes `request` out of the queue or its slot (blocks freed), wherever it is; its
        followers go on without it (the first takes over a prefill not finished yet, with the
        full prompt blocks)."""
        running, heir = request in self.running, None
        if request.leader is not None:
            request.leader.followers.remove(request)
        elif request.followers:
            (heir, *rest), request.followers = request.followers, []
            heir.leader, heir.followers = None, rest
            for follower in rest:
                follower.leader = heir
            if running:
                shared = self.shared_blocks(request)
                self.alloc.share(request.id, heir.id, shared)
                heir.computed = min(request.computed, shared * self.layout.block_size)
                routed = request.routed_experts()
                heir.routing = [] if routed is None or not heir.computed else [routed[: heir.computed]]
        if running:
            self.retire(request)
        elif request in self.waiting:
            position = self.waiting.index(request)
            del self.waiting[position]
            if heir is not None:
                self.waiting.insert(position, heir)

    def retire(self, request: Request) -> None:
        """Frees `request`'s slot and blocks, its full blocks keyed in the prefix cache first."""
        self.register(request)
        if self.prefix_cache and self.draft_depth:
            self.register_tails(request)
        self.alloc.release(request.id)
        self.running.remove(request)

    def decoding(self) -> list[Request]:
        """Running requests past their prompt, each with a sampled token not yet in the cache."""
        return [r for r in self.running if not r.prefilling and r.finish_reason is None]

    def prefill_batch(self, all_positions: bool = False) -> StepBatch | None:
        """The next prompt chunk of every prefilling request; logits at each chunk's last token
        (at every position with all_positions)."""
        rows = [r for r in self.running if r.prefilling and r.leader is None]
        if not rows:
            return None
        counts = [min(self.prefill_chunk, len(r.prompt_ids) - r.computed) for r in rows]
        width = bucket(max(counts), self.prefill_chunk)
        select = [list(range(width)) if all_positions else [c - 1] for c in counts]
        return self.batch(
            rows,
            [r.computed for r in rows],
            [r.prompt_ids[r.computed : r.computed + c] for r, c in zip(rows, counts)],
            width,
            select,
        )

    def decode_batch(self, rows: list[Request], drafts: list[list[int]]) -> StepBatch:
        """The last sampled token of each request followed by its draft tokens (a speculative
        verification); logits at every position."""
        width = 1 + len(drafts[0])
        return self.batch(
            rows,
            [r.computed for r in rows],
            [r.tokens_from(r.computed) + d for r, d in zip(rows, drafts)],
            width,
            [list(range(width))] * len(rows),
        )

    def batch(
        self,
        rows: list[Request],
        starts: list[int],
        tokens: list[list[int]],
        width: int,
        select: list[list[int]],
    ) -> StepBatch:
        """Rows b < len(rows): tokens[b] at positions starts[b] ..; padded to a bucket of rows."""
        n = self.rows_for(len(rows))
        ids = np.zeros((n, width), np.int32)
        positions = np.zeros((n, width), np.int32)
        write = np.zeros((n, width), bool)
        sel = np.zeros((n, len(select[0])), np.int32)
        for b, (start, row_tokens) in enumerate(zip(starts, tokens)):
            ids[b, : len(row_tokens)] = row_tokens
            positions[b] = start + np.arange(width)
            write[b, : len(row_tokens)] = True
            sel[b] = select[b]
        table = self.table(rows, [s + len(t) for s, t in zip(starts, tokens)], n)
        return StepBatch(ids, positions, write, table, sel, rows)

    @property
    def max_rows(self) -> int:
        """The most rows of a step."""
        return self.rows_for(self.max_seqs)

    def rows_for(self, k: int) -> int:
        """Rows of a step over k requests: a bucket, at least min_rows."""
        return max(bucket(k, self.max_seqs), self.min_rows)

    def table(self, rows: list[Request], ends: list[int], n: int) -> np.ndarray:
        """Block table [n, M] of `rows` (then n - len(rows) null rows) covering each row's
        positions < ends[b], M a bucket of blocks."""
        blocks = max(self.alloc.blocks_for(end) for end in ends)
        width = bucket(blocks, self.layout.blocks_per_seq)
        return self.alloc.table([r.id for r in rows] + [None] * (n - len(rows)), width)
