"""Schedules as data: builders produce complete valid orders, lowering gives a consistent tick
table (every payload is produced before it is read, slots never clash), CSV round-trips, and
bad input is refused with a message naming the field."""

import itertools

import numpy as np
import pytest

from frontier_jax.parallel.pipeline import schedule as S
from frontier_jax.parallel.pipeline.schedule import Field, Op, Send

CASES = [
    (name, ranks, k * ranks * (2 if name == S.ScheduleName.DUALPIPEV else 1))
    for name in S.ScheduleName
    for ranks in (2, 4, 8)
    for k in (1, 2, 4)
]


def _replay_table(tt: S.TickTable):
    """Independent check of a tick table: replay it with explicit per-rank buffers that hold
    (kind, chunk, mb) tags, as the executor would hold tensors."""
    s = tt.schedule
    P = s.ranks
    acts = [[None] * tt.act_slots for _ in range(P)]
    grads = [[None] * tt.grad_slots for _ in range(P)]
    stash = [[None] * tt.stash_slots for _ in range(P)]
    done = set()
    for row in tt.table:
        sends = {}
        for r in range(P):
            op = Op(int(row[r, Field.OP]))
            if op in (Op.F, Op.FB):
                c, m = s.local_chunks[r][row[r, Field.F_CHUNK]], int(row[r, Field.F_MB])
                slot = row[r, Field.F_INPUT]
                if c == 0:
                    assert slot == -1
                else:
                    assert acts[r][slot] == (c, m), (r, op, c, m, acts[r][slot])
                    acts[r][slot] = None
                assert stash[r][row[r, Field.F_STASH]] is None, "stash slot overwritten while live"
                stash[r][row[r, Field.F_STASH]] = (c, m)
                sends[(r, "act")] = (Send(row[r, Field.F_SEND]), (c + 1, m))
                done.add((Op.F, c, m))
            if op in (Op.B, Op.I, Op.W, Op.FB):
                c, m = s.local_chunks[r][row[r, Field.B_CHUNK]], int(row[r, Field.B_MB])
                assert stash[r][row[r, Field.B_STASH]] == (c, m)
                if op != Op.W:
                    slot = row[r, Field.B_INPUT]
                    if c == s.chunks - 1:
                        assert slot == -1
                    else:
                        assert grads[r][slot] == (c, m)
                        grads[r][slot] = None
                    sends[(r, "grad")] = (Send(row[r, Field.B_SEND]), (c - 1, m))
                if op != Op.I:
                    stash[r][row[r, Field.B_STASH]] = None
                done.add((Op.B if op == Op.FB else op, c, m))
        # deliver after every rank's reads: the payload is usable from the next tick
        for (src, kind), (direction, tag) in sends.items():
            if direction == Send.NONE:
                continue
            dst = {Send.NEXT: (src + 1) % P, Send.PREV: (src - 1) % P, Send.SELF: src}[direction]
            assert s.chunk_rank[tag[0]] == dst
            lane = {Send.NEXT: "PREV", Send.PREV: "NEXT", Send.SELF: "SELF"}[direction]
            slot = row[dst, Field[f"RECV_{kind.upper()}_{lane}"]]
            pool = acts if kind == "act" else grads
            assert pool[dst][slot] is None, "receive slot overwritten before it was read"
            pool[dst][slot] = tag
    assert all(x is None for pool in (acts, grads, stash) for rank in pool for x in rank)
    return done


@pytest.mark.parametrize("name,ranks,mbs", CASES)
def test_lowered_table_reads_only_delivered_payloads(name, ranks, mbs):
    sched = S.build(name, ranks, mbs)
    tt = S.lower(sched)
    assert tt.table.dtype == np.int32 and tt.table.shape == (tt.ticks, ranks, len(Field))
    done = _replay_table(tt)
    # every chunk and micro-batch got its forward and its whole backward
    for c, m in itertools.product(range(sched.chunks), range(mbs)):
        assert (Op.F, c, m) in done
        assert ((Op.B, c, m) in done) != ((Op.I, c, m) in done and (Op.W, c, m) in done)
    assert tt.orders() == sched.orders


@pytest.mark.parametrize("name", list(S.ScheduleName))
def test_csv_round_trip(name):
    sched = S.build(name, 4, 8)
    text = S.dumps(sched)
    assert len(text.strip().splitlines()) == 4
    assert S.loads(text).orders == sched.orders


def test_placements():
    assert S.build("1f1b", 4, 4).chunk_rank == (0, 1, 2, 3)
    assert S.build("interleaved-1f1b", 4, 4).chunk_rank == (0, 1, 2, 3, 0, 1, 2, 3)
    v = S.build("dualpipev", 4, 8)
    assert v.chunk_rank == (0, 1, 2, 3, 3, 2, 1, 0)
    assert v.local_chunks[0] == (0, 7) and v.local_chunks[3] == (3, 4)
    assert v.send_direction(3, 4) == Send.SELF and v.send_direction(4, 5) == Send.PREV


def test_dualpipev_phase_counts_follow_deepseek():
    """Rank r: 2(P-r-1) + (r+1) forwards of chunk r before any chunk-(2P-1-r) forward
    interleaves, M - 2P + r + 1 main-phase iterations, and FB steps where expected."""
    P, M = 4, 12
    v = S.dualpipev(P, M)
    for r, row in enumerate(v.orders):
        head = list(itertools.takewhile(lambda a: a.op == Op.F and a.chunk == r, row))
        assert len(head) == 2 * (P - r - 1) + 1
        n_fb = sum(a.op == Op.FB for a in row)
        main = M - 2 * P + r + 1
        assert n_fb == 2 * main - (r == P - 1) + (P - r - 1)
        n_split = sum(a.op == Op.I for a in row)
        assert n_split == sum(a.op == Op.W for a in row) > 0
        assert len(row) == 4 * M - n_fb + n_split


def test_gpipe_stashes_every_microbatch_and_1f1b_and_zb_h1_only_the_stages():
    assert S.lower(S.gpipe(4, 16)).stash_slots == 16
    assert S.lower(S.one_f_one_b(4, 16)).stash_slots == 4
    # rank r holds 1F1B's P - r forwards plus the r micro-batches whose W it delays
    assert S.lower(S.zero_bubble_h1(4, 16)).stash_slots == 4
    assert S.lower(S.dualpipev(4, 8)).stash_slots == S.lower(S.dualpipev(4, 16)).stash_slots


def test_deadlock_is_reported():
    # backwards in any order are fine as long as the data allows them
    assert S.lower(S.loads("0F0,0F1,0B0,0B1\n1F0,1F1,1B1,1B0\n")).ticks == 7
    # rank 0 waits for 0B0's gradient, which rank 1 only makes after 1F1, which needs 0F1
    swapped = "0F0,0B0,0F1,0B1\n1F1,1F0,1B0,1B1\n"
    with pytest.raises(S.ScheduleError, match="deadlock at tick 1: rank 0 waits at 0B0; rank 1 waits at 1F1"):
        S.lower(S.loads(swapped))


@pytest.mark.parametrize(
    "text,match",
    [
        ("0F0,0B0\n1F0\n", "chunk 1 micro-batch 0 needs one 1B0"),
        ("0F0,0B0,0F0\n", "repeats 0F0"),
        ("0F0,0I0\n", "needs one 0B0 or one 0I0 and one 0W0"),
        ("0F0,0X0\n", "cannot read action '0X0'"),
        ("0F0,1F0,0B0,1B0\n2F0,2B0\n", "different numbers of chunks"),
    ],
)
def test_invalid_schedules_are_refused(text, match):
    with pytest.raises(S.ScheduleError, match=match):
        S.loads(text)


def test_bad_sizes_name_the_field():
    with pytest.raises(
        S.ScheduleError, match=r"train.micro_batches=6: schedule dualpipev on 4 stages needs >= 8"
    ):
        S.build("dualpipev", 4, 6)
    with pytest.raises(S.ScheduleError, match="multiple of 4"):
        S.build("interleaved-1f1b", 4, 6)
    with pytest.raises(
        S.ScheduleError, match=r"train.pipeline.schedule='zb' is not a schedule; choose one of gpipe"
    ):
        S.build("zb", 4, 8)
