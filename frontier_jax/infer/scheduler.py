"""Continuous batching: requests wait in a queue, are admitted into decode slots between
steps while the cache has room, advance one prefill chunk or one decoded token per step, and
retire (freeing their blocks) as soon as they finish.

Admission reserves the blocks of a request's whole budget (prompt + max_new_tokens, at most
infer.max_len, plus the layout's lookahead: the draft positions a speculative verification
writes past the last kept token), so a running request never waits for memory and nothing is preempted; a
request that does not fit yet waits until retirements free enough blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from frontier_jax.infer.cache import BlockAllocator, CacheLayout
from frontier_jax.infer.sampling import SamplingParams


@dataclass
class Completion:
    """The result of one request: prompt and generated token ids, the generated text (stop
    string excluded), log p_model of each generated token, and why it ended: "stop" (stop
    token or string), "length" (max_new_tokens or infer.max_len) or "error" (see `error`)."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    logprobs: list[float]
    finish_reason: str
    error: str | None = None


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    budget: int  # tokens the request may occupy in the cache: prompt + generation
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    computed: int = 0  # leading tokens whose latent is in the cache
    mtp_computed: int = 0  # speculative decoding: leading positions final in every MTP cache
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # g^0 of positions >= mtp_computed
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

    def completion(self) -> Completion:
        return Completion(self.prompt_ids, self.output_ids, self.text, self.logprobs, self.finish_reason)


@dataclass
class Batch:
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
    def __init__(self, layout: CacheLayout, max_seqs: int, prefill_chunk: int, min_rows: int = 1):
        """min_rows: the fewest rows of a step (the ways the batch is split over a mesh)."""
        self.layout, self.max_seqs, self.prefill_chunk = layout, max_seqs, prefill_chunk
        self.min_rows = min_rows
        self.alloc = BlockAllocator(layout)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self) -> None:
        """Moves waiting requests into free decode slots, first come first served."""
        while self.waiting and len(self.running) < self.max_seqs:
            request = self.waiting[0]
            tokens = request.budget + self.layout.lookahead
            if not self.alloc.can_hold(request.id, tokens):
                return
            self.alloc.reserve(request.id, tokens)
            self.running.append(self.waiting.popleft())

    def retire(self, request: Request) -> None:
        self.alloc.release(request.id)
        self.running.remove(request)

    def decoding(self) -> list[Request]:
        """Running requests past their prompt, each with a sampled token not yet in the cache."""
        return [r for r in self.running if not r.prefilling and r.finish_reason is None]

    def prefill_batch(self, all_positions: bool = False) -> Batch | None:
        """The next prompt chunk of every prefilling request; logits at each chunk's last token
        (at every position with all_positions)."""
        rows = [r for r in self.running if r.prefilling]
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

    def decode_batch(self, rows: list[Request], drafts: list[list[int]]) -> Batch:
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
    ) -> Batch:
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
        return Batch(ids, positions, write, table, sel, rows)

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
