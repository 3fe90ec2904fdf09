"""Pipeline schedules as data: per-rank action orders, their builders, and the tick table.

A model is cut into `C` chunks (virtual stages) ``0 .. C-1``; chunk ``c`` runs on one of ``P``
ranks. A micro-batch ``m`` flows forward ``F(0,m) -> F(1,m) -> ... -> F(C-1,m)`` (the last
chunk's F also computes the loss) and backward ``B(C-1,m) -> ... -> B(0,m)``. A backward may be
split into ``I`` (gradient w.r.t. the chunk's input, on the critical path) and ``W`` (gradient
w.r.t. its weights, deferrable): ``B = I + W``. ``FB`` runs a forward of one micro-batch and a
full backward of another in one step (DualPipe's overlapped chunk).

Placements: *loop* puts chunk ``c`` on rank ``c % P`` (GPipe, 1F1B, ZB-H1: ``C = P``;
interleaved: ``C = vP``); *V* puts chunks ``r`` and ``2P-1-r`` on rank ``r`` (DualPipeV), so
both ends of the model (embedding and head + loss) sit on rank 0. A schedule only lists actions
per rank; the placement is read off which row a chunk appears in.

Lowering (`lower`) replays the orders in lock-step ticks: at tick ``t`` a rank runs its next
action if everything it needs was produced at a tick ``< t`` (a payload sent at ``t`` is usable
at ``t + 1``), otherwise it idles; a tick where no rank can move is a deadlock. The result is
``int32[ticks, P, len(Field)]`` with activation / gradient receive slots and residual stash
slots assigned as ring buffers (lowest free slot; a slot freed at ``t`` is reusable at ``t+1``).

CSV (`dumps` / `loads`): one row per rank, one cell per action, torch.distributed.pipelining's
spelling: ``3F0`` = forward of chunk 3 on micro-batch 0, ``3B0`` full backward, ``3I0`` input
gradient, ``3W0`` weight gradient, ``(0F5;7B2)OVERLAP_F_B`` an FB step.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import functools
import io
import re

import numpy as np


class ScheduleError(ValueError):
    """A schedule that cannot run: invalid actions, missing work, or a deadlock."""


class Op(enum.IntEnum):
    """Tick-table op codes (the executor's `lax.switch` index)."""

    IDLE = 0
    F = 1
    B = 2
    I = 3  # noqa: E741 - the zero-bubble papers' name for the input-gradient pass
    W = 4
    FB = 5


class Send(enum.IntEnum):
    """Where a step's output goes: nowhere (loss / first chunk), the next / previous rank, itself."""

    NONE = 0
    NEXT = 1
    PREV = 2
    SELF = 3


class Field(enum.IntEnum):
    """Columns of the tick table. Chunks are *local* indices (0 .. chunks per rank - 1)."""

    OP = 0
    F_CHUNK = 1  # local chunk of the forward (F, FB)
    F_MB = 2
    B_CHUNK = 3  # local chunk of the backward (B, I, W, FB)
    B_MB = 4
    F_INPUT = 5  # activation receive slot the forward reads; -1: the first chunk embeds the batch
    B_INPUT = 6  # gradient receive slot the backward reads; -1: the last chunk seeds from its loss
    F_STASH = 7  # stash slot the forward writes its residuals to
    B_STASH = 8  # stash slot the backward (or W) reads
    F_SEND = 9  # Send of the forward's output activation
    B_SEND = 10  # Send of the backward's input gradient
    RECV_ACT_PREV = 11  # activation slot written from the previous rank's payload (-1: none)
    RECV_GRAD_PREV = 12
    RECV_ACT_NEXT = 13
    RECV_GRAD_NEXT = 14
    RECV_ACT_SELF = 15
    RECV_GRAD_SELF = 16


@dataclasses.dataclass(frozen=True)
class Action:
    """One step of a rank: ``op`` on (global) ``chunk`` and micro-batch ``mb``; for FB the
    forward is (``chunk``, ``mb``) and the full backward (``b_chunk``, ``b_mb``)."""

    op: Op
    chunk: int
    mb: int
    b_chunk: int = -1
    b_mb: int = -1

    def __str__(self) -> str:
        if self.op == Op.FB:
            return f"({self.chunk}F{self.mb};{self.b_chunk}B{self.b_mb})OVERLAP_F_B"
        return f"{self.chunk}{self.op.name}{self.mb}"

    def parts(self) -> list[tuple[Op, int, int]]:
        """The (op, chunk, mb) computations of this step (two for FB)."""
        if self.op == Op.FB:
            return [(Op.F, self.chunk, self.mb), (Op.B, self.b_chunk, self.b_mb)]
        return [(self.op, self.chunk, self.mb)]


_SIMPLE = re.compile(r"^(\d+)([FBIW])(\d+)$")
_OVERLAP = re.compile(r"^\((\d+)F(\d+);(\d+)B(\d+)\)OVERLAP_F_B$")


def parse_action(text: str) -> Action:
    """``"3F0"`` -> Action(F, 3, 0); ``"(0F5;7B2)OVERLAP_F_B"`` -> an FB action."""
    text = text.strip()
    if m := _SIMPLE.match(text):
        return Action(Op[m.group(2)], int(m.group(1)), int(m.group(3)))
    if m := _OVERLAP.match(text):
        return Action(Op.FB, int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)))
    raise ScheduleError(
        f"schedule CSV: cannot read action {text!r}; write e.g. '3F0', '3B0', '3I0', '3W0' "
        "or '(0F5;7B2)OVERLAP_F_B'"
    )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-rank action orders (``orders[r]`` is rank r's list), validated on construction."""

    orders: tuple[tuple[Action, ...], ...]
    name: str = "custom"

    def __post_init__(self):
        _validate(self)

    @functools.cached_property
    def ranks(self) -> int:
        return len(self.orders)

    @functools.cached_property
    def chunks(self) -> int:
        return 1 + max(a.chunk for row in self.orders for a in row)

    @functools.cached_property
    def microbatches(self) -> int:
        return 1 + max(a.mb for row in self.orders for a in row)

    @functools.cached_property
    def chunks_per_rank(self) -> int:
        return self.chunks // self.ranks

    @functools.cached_property
    def chunk_rank(self) -> tuple[int, ...]:
        """``chunk_rank[c]``: the rank that runs chunk c."""
        owner = {}
        for r, row in enumerate(self.orders):
            for a in row:
                for _, c, _ in a.parts():
                    owner[c] = r
        return tuple(owner[c] for c in range(self.chunks))

    @functools.cached_property
    def local_chunks(self) -> tuple[tuple[int, ...], ...]:
        """``local_chunks[r]``: the global chunks of rank r in local-index order (ascending)."""
        owner = self.chunk_rank
        return tuple(tuple(c for c in range(self.chunks) if owner[c] == r) for r in range(self.ranks))

    def local_index(self, chunk: int) -> int:
        return self.local_chunks[self.chunk_rank[chunk]].index(chunk)

    def send_direction(self, src_chunk: int, dst_chunk: int) -> Send:
        """How a payload moves from the rank of ``src_chunk`` to that of ``dst_chunk`` (cyclic)."""
        src, dst = self.chunk_rank[src_chunk], self.chunk_rank[dst_chunk]
        if src == dst:
            return Send.SELF
        if dst == (src + 1) % self.ranks:
            return Send.NEXT
        if dst == (src - 1) % self.ranks:
            return Send.PREV
        raise ScheduleError(
            f"schedule {self.name}: chunk {src_chunk} (rank {src}) feeds chunk {dst_chunk} (rank {dst}); "
            "consecutive chunks must sit on the same or neighbouring ranks"
        )


def _validate(s: Schedule) -> None:
    """Every (chunk, mb) has one F and either one B or one I and one W, on one rank per chunk,
    and every rank holds the same number of chunks."""
    if not s.orders or not any(s.orders):
        raise ScheduleError(f"schedule {s.name}: no actions")
    owner: dict[int, int] = {}
    seen: dict[tuple[Op, int, int], int] = {}
    for r, row in enumerate(s.orders):
        for a in row:
            if a.op == Op.IDLE:
                raise ScheduleError(f"schedule {s.name}: rank {r} lists an IDLE action; leave it out")
            if a.op == Op.FB and a.chunk == a.b_chunk and a.mb == a.b_mb:
                raise ScheduleError(f"schedule {s.name}: rank {r} action {a} overlaps a pass with itself")
            for op, c, m in a.parts():
                if c < 0 or m < 0:
                    raise ScheduleError(f"schedule {s.name}: rank {r} action {a} has a negative index")
                if owner.setdefault(c, r) != r:
                    raise ScheduleError(
                        f"schedule {s.name}: chunk {c} appears on ranks {owner[c]} and {r}; a chunk lives on one rank"
                    )
                key = (op, c, m)
                if key in seen:
                    raise ScheduleError(f"schedule {s.name}: rank {r} repeats {c}{op.name}{m}")
                seen[key] = r
    chunks, mbs = s.chunks, s.microbatches
    if sorted(owner) != list(range(chunks)):
        raise ScheduleError(f"schedule {s.name}: chunks {sorted(set(range(chunks)) - set(owner))} never run")
    counts = {sum(1 for c in owner if owner[c] == r) for r in range(s.ranks)}
    if len(counts) != 1:
        raise ScheduleError(f"schedule {s.name}: ranks hold different numbers of chunks {sorted(counts)}")
    for c in range(chunks):
        for m in range(mbs):
            if (Op.F, c, m) not in seen:
                raise ScheduleError(f"schedule {s.name}: {c}F{m} is missing")
            full, split_i, split_w = ((op, c, m) in seen for op in (Op.B, Op.I, Op.W))
            if not (full ^ (split_i and split_w)) or (full and (split_i or split_w)) or split_i != split_w:
                raise ScheduleError(
                    f"schedule {s.name}: chunk {c} micro-batch {m} needs one {c}B{m} or one {c}I{m} and one {c}W{m}"
                )


# --------------------------------------------------------------------------- builders


def _check_sizes(name: str, ranks: int, microbatches: int, least: int, multiple: int = 1) -> None:
    if ranks < 1:
        raise ScheduleError(f"train.pipeline: {name} needs mesh.stage >= 1, got {ranks}")
    if microbatches < least or microbatches % multiple:
        need = f">= {least}" + (f" and a multiple of {multiple}" if multiple > 1 else "")
        raise ScheduleError(
            f"train.micro_batches={microbatches}: schedule {name} on {ranks} stages needs {need}; "
            "raise train.micro_batches"
        )


def gpipe(ranks: int, microbatches: int) -> Schedule:
    """All forwards, then all backwards: every rank stashes M micro-batches' residuals."""
    _check_sizes("gpipe", ranks, microbatches, 1)
    m = range(microbatches)
    return Schedule(
        tuple(tuple([Action(Op.F, r, i) for i in m] + [Action(Op.B, r, i) for i in m]) for r in range(ranks)),
        "gpipe",
    )


def _one_f_one_b_rank(r: int, ranks: int, microbatches: int, backward: Op) -> list[Action]:
    """Warm up with P-1-r forwards, then alternate F / backward, then drain the backwards."""
    warmup = min(ranks - 1 - r, microbatches)
    row = [Action(Op.F, r, i) for i in range(warmup)]
    for i in range(microbatches - warmup):
        row += [Action(Op.F, r, warmup + i), Action(backward, r, i)]
    row += [Action(backward, r, i) for i in range(microbatches - warmup, microbatches)]
    return row


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): at most P-r micro-batches live on rank r; bubble (P-1)(F+B)."""
    _check_sizes("1f1b", ranks, microbatches, ranks)
    return Schedule(
        tuple(tuple(_one_f_one_b_rank(r, ranks, microbatches, Op.B)) for r in range(ranks)), "1f1b"
    )


def zero_bubble_h1(ranks: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2024): 1F1B with B split into I + W. Rank r runs W of micro-batch i
    only after I of micro-batch ``i + r`` (W's that the cool-down then uses to fill the wait for
    gradients), so the live set stays 1F1B's while the bubble drops to (P-1)(F+B-2W)."""
    _check_sizes("zb-h1", ranks, microbatches, ranks)
    orders = []
    for r in range(ranks):
        row, done_w = [], 0
        for a in _one_f_one_b_rank(r, ranks, microbatches, Op.I):
            row.append(a)
            if a.op == Op.I and a.mb - done_w >= r:
                row.append(Action(Op.W, r, done_w))
                done_w += 1
        row += [Action(Op.W, r, i) for i in range(done_w, microbatches)]
        orders.append(tuple(row))
    return Schedule(tuple(orders), "zb-h1")


def interleaved_1f1b(ranks: int, microbatches: int, chunks_per_rank: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021): rank r holds chunks r, r+P, ..., cycles through
    them P micro-batches at a time; bubble (P-1)(F+B)/v with v chunks per rank."""
    _check_sizes("interleaved-1f1b", ranks, microbatches, ranks, ranks)
    v, total = chunks_per_rank, chunks_per_rank * microbatches

    def nth(k: int, backward: bool) -> tuple[int, int]:
        local = (k // ranks) % v
        return (v - 1 - local if backward else local), (k // (ranks * v)) * ranks + k % ranks

    orders = []
    for r in range(ranks):
        warmup = min((ranks - 1 - r) * 2 + (v - 1) * ranks, total)
        row = []
        for k in range(total + warmup):
            if k < total:
                local, mb = nth(k, False)
                row.append(Action(Op.F, local * ranks + r, mb))
            if k >= warmup:
                local, mb = nth(k - warmup, True)
                row.append(Action(Op.B, local * ranks + r, mb))
        orders.append(tuple(row))
    return Schedule(tuple(orders), "interleaved-1f1b")


def dualpipev(ranks: int, microbatches: int) -> Schedule:
    """DualPipeV (DeepSeek's "cut-in-half" DualPipe): 2P chunks on P ranks in a V, rank r runs
    chunk r (phase 0, going down the ranks) and chunk 2P-1-r (phase 1, coming back up). Each
    rank's order follows DeepSeek's eight phases: nF0, nF0F1, nB1W1F1, the main nF0B1F1B0 of
    overlapped FB steps, nB1F1B0, nB1B0 (second half zero-bubble), nWB0, nW. Needs M >= 2P."""
    _check_sizes("dualpipev", ranks, microbatches, 2 * ranks)
    orders = []
    for r in range(ranks):
        chunk = (r, 2 * ranks - 1 - r)
        next_f, next_b = [0, 0], [0, 0]
        pending_w: list[Action] = []
        row: list[Action] = []

        def forward(phase):
            row.append(Action(Op.F, chunk[phase], next_f[phase]))
            next_f[phase] += 1

        def backward(phase, zero_bubble=False):
            act = Action(Op.I if zero_bubble else Op.B, chunk[phase], next_b[phase])
            row.append(act)
            next_b[phase] += 1
            if zero_bubble:
                pending_w.append(Action(Op.W, act.chunk, act.mb))

        def weight():
            row.append(pending_w.pop(0))

        def forward_backward(f_phase, b_phase):
            row.append(Action(Op.FB, chunk[f_phase], next_f[f_phase], chunk[b_phase], next_b[b_phase]))
            next_f[f_phase] += 1
            next_b[b_phase] += 1

        for _ in range((ranks - r - 1) * 2):
            forward(0)
        for _ in range(r + 1):
            forward(0)
            forward(1)
        for _ in range(ranks - r - 1):
            backward(1, zero_bubble=True)
            weight()
            forward(1)
        for i in range(microbatches - 2 * ranks + r + 1):
            if i == 0 and r == ranks - 1:  # the turn of the V: not overlapped, as DeepSeek does
                forward(0)
                backward(1)
            else:
                forward_backward(0, 1)
            forward_backward(1, 0)
        for _ in range(ranks - r - 1):
            backward(1)
            forward_backward(1, 0)
        zero_bubble = False
        for i in range(r + 1):
            zero_bubble |= i == (r + 1) // 2 and r % 2 == 1
            backward(1, zero_bubble)
            zero_bubble |= i == (r + 1) // 2 and r % 2 == 0
            backward(0, zero_bubble)
        for _ in range(ranks - r - 1):
            weight()
            backward(0, zero_bubble=True)
        while pending_w:
            weight()
        orders.append(tuple(row))
    return Schedule(tuple(orders), "dualpipev")


class ScheduleName(enum.StrEnum):
    """The builders `train.pipeline.schedule` can name."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED_1F1B = "interleaved-1f1b"
    ZERO_BUBBLE_H1 = "zb-h1"
    DUALPIPEV = "dualpipev"


BUILDERS = {
    ScheduleName.GPIPE: gpipe,
    ScheduleName.ONE_F_ONE_B: one_f_one_b,
    ScheduleName.INTERLEAVED_1F1B: interleaved_1f1b,
    ScheduleName.ZERO_BUBBLE_H1: zero_bubble_h1,
    ScheduleName.DUALPIPEV: dualpipev,
}


def chunks_for(name: ScheduleName | str, ranks: int) -> int:
    """How many model chunks a schedule cuts the layer stack into on ``ranks`` stages."""
    return ranks * (2 if ScheduleName(name) in (ScheduleName.INTERLEAVED_1F1B, ScheduleName.DUALPIPEV) else 1)


def build(name: ScheduleName | str, ranks: int, microbatches: int) -> Schedule:
    """The named schedule for ``ranks`` stages and ``microbatches`` micro-batches."""
    try:
        key = ScheduleName(name)
    except ValueError:
        choices = ", ".join(s.value for s in ScheduleName)
        raise ScheduleError(
            f"train.pipeline.schedule={name!r} is not a schedule; choose one of {choices}"
        ) from None
    return BUILDERS[key](ranks, microbatches)


# --------------------------------------------------------------------------- CSV


def dumps(schedule: Schedule) -> str:
    """One CSV row per rank, one action string per cell."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in schedule.orders:
        writer.writerow([str(a) for a in row])
    return out.getvalue()


def loads(text: str, name: str = "custom") -> Schedule:
    """Read `dumps`' format (rows of torch-style action strings); validates the result."""
    rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
    return Schedule(tuple(tuple(parse_action(c) for c in r if c.strip()) for r in rows), name)


# --------------------------------------------------------------------------- lowering


@dataclasses.dataclass(frozen=True)
class TickTable:
    """``table[t, r]`` is rank r's row at tick t (columns: `Field`), plus the buffer sizes the
    executor allocates on every rank (the worst rank's peak)."""

    table: np.ndarray  # int32[ticks, ranks, len(Field)]
    stash_slots: int
    act_slots: int
    grad_slots: int
    schedule: Schedule

    @property
    def ticks(self) -> int:
        return self.table.shape[0]

    def trace(self) -> list[list[str]]:
        """Per tick, per rank: the action string (global chunks) or '' when idle; for diffing."""
        return [
            [str(row_action(self.schedule, r, row) or "") for r, row in enumerate(tick)]
            for tick in self.table
        ]

    def orders(self) -> tuple[tuple[Action, ...], ...]:
        """The per-rank action orders this table executes (idle ticks dropped)."""
        rows = [
            [row_action(self.schedule, r, tick[r]) for tick in self.table] for r in range(self.schedule.ranks)
        ]
        return tuple(tuple(a for a in row if a is not None) for row in rows)


def row_action(s: Schedule, r: int, row: np.ndarray) -> Action | None:
    """The action one table row of rank r encodes (None when idle)."""
    op = Op(int(row[Field.OP]))
    f = (s.local_chunks[r][row[Field.F_CHUNK]], int(row[Field.F_MB]))
    b = (s.local_chunks[r][row[Field.B_CHUNK]], int(row[Field.B_MB]))
    if op == Op.IDLE:
        return None
    if op == Op.F:
        return Action(op, *f)
    return Action(op, *f, *b) if op == Op.FB else Action(op, *b)


class _Slots:
    """A ring of buffer slots: the lowest free slot is taken; a released slot is free next tick."""

    def __init__(self):
        self.free: list[int] = []
        self.size = 0
        self.released: list[int] = []

    def take(self) -> int:
        if self.free:
            return self.free.pop(self.free.index(min(self.free)))
        self.size += 1
        return self.size - 1

    def release(self, slot: int) -> None:
        self.released.append(slot)

    def next_tick(self) -> None:
        self.free += self.released
        self.released = []


def _ready(s: Schedule, part: tuple[Op, int, int], done: dict, arrived: dict, t: int) -> bool:
    """Whether one computation can run at tick t (its inputs were produced before t)."""
    op, c, m = part
    if op == Op.F:
        return c == 0 or arrived.get(("act", c, m), t) < t
    if op in (Op.B, Op.I):
        forward_done = done.get((Op.F, c, m), t) < t
        return forward_done and (c == s.chunks - 1 or arrived.get(("grad", c, m), t) < t)
    return done.get((Op.I, c, m), t) < t  # W


def lower(schedule: Schedule) -> TickTable:
    """Assign ticks, slots and sends (see the module docstring); raises `ScheduleError` on deadlock."""
    s = schedule
    P, C = s.ranks, s.chunks
    rows: list[np.ndarray] = []
    pos = [0] * P
    done: dict[tuple[Op, int, int], int] = {}
    arrived: dict[tuple[str, int, int], int] = {}
    act_slot: dict[tuple[int, int], int] = {}  # (chunk, mb) -> activation slot on the chunk's rank
    grad_slot: dict[tuple[int, int], int] = {}
    stash_slot: dict[tuple[int, int], int] = {}
    acts, grads, stash = ([_Slots() for _ in range(P)] for _ in range(3))
    recv_field = {
        ("act", Send.NEXT): Field.RECV_ACT_PREV,
        ("grad", Send.NEXT): Field.RECV_GRAD_PREV,
        ("act", Send.PREV): Field.RECV_ACT_NEXT,
        ("grad", Send.PREV): Field.RECV_GRAD_NEXT,
        ("act", Send.SELF): Field.RECV_ACT_SELF,
        ("grad", Send.SELF): Field.RECV_GRAD_SELF,
    }
    t = 0
    while any(pos[r] < len(s.orders[r]) for r in range(P)):
        tick = np.full((P, len(Field)), -1, np.int32)
        tick[:, Field.OP] = Op.IDLE
        tick[:, [Field.F_SEND, Field.B_SEND]] = Send.NONE
        tick[:, [Field.F_CHUNK, Field.F_MB, Field.B_CHUNK, Field.B_MB]] = 0
        running = []
        for r in range(P):
            if pos[r] < len(s.orders[r]):
                action = s.orders[r][pos[r]]
                if all(_ready(s, p, done, arrived, t) for p in action.parts()):
                    running.append((r, action))
        if not running:
            blocked = "; ".join(
                f"rank {r} waits at {s.orders[r][pos[r]]}" for r in range(P) if pos[r] < len(s.orders[r])
            )
            raise ScheduleError(f"schedule {s.name}: deadlock at tick {t}: {blocked}")
        deliveries = []
        for r, action in running:
            pos[r] += 1
            tick[r, Field.OP] = action.op
            for op, c, m in action.parts():
                local = s.local_index(c)
                done[(op, c, m)] = t
                if op == Op.F:
                    tick[r, Field.F_CHUNK], tick[r, Field.F_MB] = local, m
                    tick[r, Field.F_INPUT] = act_slot.pop((c, m)) if c > 0 else -1
                    if c > 0:
                        acts[r].release(tick[r, Field.F_INPUT])
                    stash_slot[(c, m)] = tick[r, Field.F_STASH] = stash[r].take()
                    if c < C - 1:
                        tick[r, Field.F_SEND] = s.send_direction(c, c + 1)
                        deliveries.append(("act", c + 1, m, Send(tick[r, Field.F_SEND])))
                    continue
                tick[r, Field.B_CHUNK], tick[r, Field.B_MB] = local, m
                tick[r, Field.B_STASH] = stash_slot[(c, m)]
                if op in (Op.B, Op.W):
                    stash[r].release(stash_slot.pop((c, m)))
                if op in (Op.B, Op.I):
                    tick[r, Field.B_INPUT] = grad_slot.pop((c, m)) if c < C - 1 else -1
                    if c < C - 1:
                        grads[r].release(tick[r, Field.B_INPUT])
                    if c > 0:
                        tick[r, Field.B_SEND] = s.send_direction(c, c - 1)
                        deliveries.append(("grad", c - 1, m, Send(tick[r, Field.B_SEND])))
        for kind, c, m, direction in deliveries:
            dst = s.chunk_rank[c]
            pool, slots = (acts, act_slot) if kind == "act" else (grads, grad_slot)
            slots[(c, m)] = tick[dst, recv_field[(kind, direction)]] = pool[dst].take()
            arrived[(kind, c, m)] = t
        for pool in (*acts, *grads, *stash):
            pool.next_tick()
        rows.append(tick)
        t += 1
    return TickTable(
        table=np.stack(rows),
        stash_slots=max(p.size for p in stash),
        act_slots=max(1, max(p.size for p in acts)),
        grad_slots=max(1, max(p.size for p in grads)),
        schedule=s,
    )
