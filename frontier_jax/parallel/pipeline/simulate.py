"""Replay a pipeline schedule with per-op costs: makespan, bubbles, live activations, deadlocks.

Each rank runs its actions in order; an action starts when its rank is free and its inputs are
ready: ``F(c,m)`` needs ``F(c-1,m)``'s activation, ``B/I(c,m)`` needs ``F(c,m)`` and the gradient
of ``B/I(c+1,m)``, ``W(c,m)`` needs ``I(c,m)``; a payload between ranks arrives ``p2p`` after its
producer ends (zero on the same rank). Costs: ``F``, full backward ``B``, weight gradient ``W``,
input gradient ``I = B - W``, and ``FB`` (DeepSeek's F&B: one forward and one full backward of
other micro-batches, overlapped).

The bubble of rank r is ``makespan - busy_r``. With ``p2p = 0`` and ``M`` micro-batches on ``P``
ranks, the simulated bubbles equal DeepSeek-V3's Table 2 (and GPipe's makespan) where the costs
meet the conditions below; outside them the worst rank's critical path changes and the simulated
bubble, which is the right one for those costs, differs from the formula
(`tests/parallel/pipeline/test_simulate.py` checks both sides of each condition):

- GPipe: makespan ``(M + P - 1)(F + B)``, any costs;
- 1F1B: bubble ``(P - 1)(F + B)`` on every rank, any costs;
- ZB-H1 ("ZB1P"): bubble ``(P - 1)(F + B - 2W)`` on every rank **only when W <= F and
  W <= I = B - W**;
- DualPipeV: bubble ``(PP/2 - 1)(F&B + B - 3W)`` on the worst rank, where **PP = 2P is the
  number of chunks (pipeline stages)**, i.e. ``(P - 1)(F&B + B - 3W)`` on P ranks; F, B, W are
  the costs of one chunk (half a 1F1B stage). It holds **only when I = F** (an input gradient
  costs a forward, as DeepSeek's count assumes), **W <= F and max(F, B) <= F&B <= F + B** (the
  overlap saves at most the shorter pass);
- interleaved 1F1B with v chunks per rank: ``(P - 1)(F + B) / v`` (F, B of a 1F1B stage), any
  costs.

Live activations: a micro-batch's residuals on a rank are live from the start of its F to the
end of its B (or of its W when split); the peak per rank sizes the executor's stash.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from frontier_jax.parallel.pipeline.schedule import Action, Field, Op, Schedule, ScheduleError, TickTable


@dataclasses.dataclass(frozen=True)
class Costs:
    """Durations of one chunk's passes (any unit) and of one stage-to-stage transfer."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None  # overlapped F&B; None: F + B (no overlap)
    p2p: float = 0.0

    def of(self, op: Op) -> float:
        if op == Op.FB:
            return self.F + self.B if self.FB is None else self.FB
        return {Op.F: self.F, Op.B: self.B, Op.I: self.B - self.W, Op.W: self.W}[op]


@dataclasses.dataclass(frozen=True)
class Interval:
    rank: int
    start: float
    end: float
    action: Action


@dataclasses.dataclass(frozen=True)
class Simulation:
    """The replayed timeline and what it implies."""

    schedule: Schedule
    costs: Costs
    intervals: tuple[Interval, ...]
    makespan: float
    busy: tuple[float, ...]  # per rank
    peak_live: tuple[int, ...]  # per rank, in chunk-activations

    @property
    def bubble(self) -> tuple[float, ...]:
        """Idle time per rank: makespan minus its busy time."""
        return tuple(self.makespan - b for b in self.busy)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time: sum(bubble) / (P * makespan)."""
        return sum(self.bubble) / (len(self.busy) * self.makespan)


def _needs(s: Schedule, op: Op, c: int, m: int) -> list[tuple[Op | str, int, int]]:
    """The (producer, chunk, mb) keys one computation waits for; "bwd" = B or I."""
    if op == Op.F:
        return [(Op.F, c - 1, m)] if c > 0 else []
    if op in (Op.B, Op.I):
        return [(Op.F, c, m)] + ([("bwd", c + 1, m)] if c < s.chunks - 1 else [])
    return [(Op.I, c, m)]


def simulate(schedule: Schedule | TickTable, costs: Costs = Costs()) -> Simulation:
    """Event-driven replay of per-rank orders (a `TickTable` replays its rows' order)."""
    s = schedule.schedule if isinstance(schedule, TickTable) else schedule
    orders = schedule.orders() if isinstance(schedule, TickTable) else s.orders
    owner = s.chunk_rank
    end: dict[tuple, float] = {}
    clock = [0.0] * s.ranks
    pos = [0] * s.ranks
    intervals: list[Interval] = []

    def start_time(r: int, action: Action) -> float | None:
        keys = [key for part in action.parts() for key in _needs(s, *part)]
        if any(key not in end for key in keys):
            return None
        return max([clock[r]] + [end[k] + (0.0 if owner[k[1]] == r else costs.p2p) for k in keys])

    while any(pos[r] < len(orders[r]) for r in range(s.ranks)):
        moved = False
        for r in range(s.ranks):
            while pos[r] < len(orders[r]) and (start := start_time(r, orders[r][pos[r]])) is not None:
                action = orders[r][pos[r]]
                clock[r] = start + costs.of(action.op)
                for op, c, m in action.parts():
                    end[(op, c, m)] = clock[r]
                    if op in (Op.B, Op.I):
                        end[("bwd", c, m)] = clock[r]
                intervals.append(Interval(r, start, clock[r], action))
                pos[r] += 1
                moved = True
        if not moved:
            blocked = "; ".join(
                f"rank {r} waits at {orders[r][pos[r]]}" for r in range(s.ranks) if pos[r] < len(orders[r])
            )
            raise ScheduleError(f"schedule {s.name}: deadlock: {blocked}")
    busy = tuple(sum(i.end - i.start for i in intervals if i.rank == r) for r in range(s.ranks))
    return Simulation(s, costs, tuple(intervals), max(clock), busy, _peak_live(s, intervals))


def _peak_live(s: Schedule, intervals: list[Interval]) -> tuple[int, ...]:
    """Max over time of residual sets held per rank (allocations at F start, frees at B / W end;
    a free and an allocation at the same instant free first)."""
    events: list[list[tuple[float, int]]] = [[] for _ in range(s.ranks)]
    for iv in intervals:
        for op, _, _ in iv.action.parts():
            if op == Op.F:
                events[iv.rank].append((iv.start, +1))
            elif op in (Op.B, Op.W):
                events[iv.rank].append((iv.end, -1))
    peaks = []
    for ev in events:
        live = peak = 0
        for _, delta in sorted(ev):
            live += delta
            peak = max(peak, live)
        peaks.append(peak)
    return tuple(peaks)


def lockstep_makespan(table: TickTable, costs: Costs = Costs()) -> float:
    """Time of the SPMD executor, where every tick waits for its slowest rank (plus one p2p):
    ``sum_t (max_r cost(op[t, r]) + p2p)``."""
    cost = np.array([0.0] + [costs.of(op) for op in list(Op)[1:]])
    return float((cost[table.table[:, :, Field.OP]].max(axis=1) + costs.p2p).sum())
