"""The simulator reproduces DeepSeek-V3's Table 2 (bubbles of 1F1B, ZB1P, DualPipeV) and
GPipe's makespan from first principles, with distinct costs so that a wrong coefficient shows."""

import pytest

from frontier_jax.parallel.pipeline import schedule as S
from frontier_jax.parallel.pipeline.simulate import Costs, lockstep_makespan, simulate
from frontier_jax.parallel.pipeline.timeline import main as timeline_main

# distinct costs of one chunk's passes; I = B - W = 11 = F (DeepSeek's Table 2 counts an input
# gradient as one forward), W < F, and the overlapped F&B cheaper than F + B
F, B, W, FB = 11.0, 20.0, 9.0, 27.0
COSTS = Costs(F=F, B=B, W=W, FB=FB)


@pytest.mark.parametrize("P", [2, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_gpipe_makespan_is_m_plus_p_minus_1_stages(P, k):
    M = k * P
    assert simulate(S.gpipe(P, M), COSTS).makespan == (M + P - 1) * (F + B)


@pytest.mark.parametrize("P", [2, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_1f1b_bubble_is_p_minus_1_times_f_plus_b(P, k):
    sim = simulate(S.one_f_one_b(P, k * P), COSTS)
    assert sim.bubble == pytest.approx([(P - 1) * (F + B)] * P)
    assert sim.peak_live == tuple(P - r for r in range(P))


@pytest.mark.parametrize("P", [2, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_interleaved_bubble_is_1f1b_bubble_over_chunks_per_rank(P, k):
    """With v = 2 chunks per rank each chunk costs half a 1F1B stage: bubble (P-1)(F+B)/2."""
    sim = simulate(S.interleaved_1f1b(P, k * P), Costs(F / 2, B / 2, W / 2, FB / 2))
    assert sim.bubble == pytest.approx([(P - 1) * (F + B) / 2] * P)


@pytest.mark.parametrize("P", [2, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_zb_h1_bubble_is_p_minus_1_times_f_plus_b_minus_2w(P, k):
    sim = simulate(S.zero_bubble_h1(P, k * P), COSTS)
    assert sim.bubble == pytest.approx([(P - 1) * (F + B - 2 * W)] * P)
    assert max(sim.peak_live) == P  # 1F1B's peak


@pytest.mark.parametrize("P", [2, 4, 8])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_dualpipev_bubble_is_half_pp_minus_1_times_fb_plus_b_minus_3w(P, k):
    """PP in DeepSeek's formula is the number of pipeline stages = chunks = 2P for DualPipeV on
    P ranks, so the worst rank idles (PP/2 - 1)(F&B + B - 3W) = (P - 1)(F&B + B - 3W)."""
    sched = S.dualpipev(P, k * P)
    PP = sched.chunks
    assert PP == 2 * P
    sim = simulate(sched, COSTS)
    assert max(sim.bubble) == pytest.approx((PP / 2 - 1) * (FB + B - 3 * W))
    assert sim.peak_live == (2 * P + 1,) * P  # flat in M: no more than 2P+1 chunk activations


@pytest.mark.parametrize(
    "f,b,w,holds",
    [
        (11, 20, 9, True),  # W <= F, W <= I = 11
        (11, 16, 5, True),
        (6, 20, 9, False),  # W > F
        (11, 15, 9, False),  # W > I = 6
    ],
)
def test_zb_h1_formula_holds_only_when_w_is_at_most_f_and_i(f, b, w, holds):
    """Table 2's ZB1P bubble (P-1)(F + B - 2W) is the simulated one when W <= F and W <= I;
    outside, the simulator's (larger) bubble is the schedule's and the formula undercounts."""
    sim = simulate(S.zero_bubble_h1(4, 8), Costs(F=f, B=b, W=w))
    formula = 3 * (f + b - 2 * w)
    assert (sim.bubble == pytest.approx([formula] * 4)) == holds
    assert min(sim.bubble) >= formula


@pytest.mark.parametrize(
    "f,b,w,fb,holds",
    [
        (11, 20, 9, 27, True),  # I = F, W <= F, max(F, B) <= F&B <= F + B
        (11, 20, 9, 20, True),  # F&B = max(F, B)
        (11, 20, 9, 31, True),  # F&B = F + B
        (11, 24, 9, 27, False),  # I = 15 != F
        (8, 20, 12, 24, False),  # I = F but W > F
        (11, 20, 9, 18, False),  # F&B < max(F, B)
        (11, 20, 9, 32, False),  # F&B > F + B
    ],
)
def test_dualpipev_formula_holds_only_inside_deepseeks_cost_conditions(f, b, w, fb, holds):
    sim = simulate(S.dualpipev(4, 8), Costs(F=f, B=b, W=w, FB=fb))
    assert (max(sim.bubble) == pytest.approx(3 * (fb + b - 3 * w))) == holds


def test_p2p_latency_lengthens_the_pipeline():
    # GPipe on 2 ranks: the critical path crosses the link once forward and once backward
    for M in (2, 4):
        assert simulate(S.gpipe(2, M), Costs(F, B, W, FB, p2p=2.0)).makespan == (M + 1) * (F + B) + 2 * 2.0


def test_table_replay_equals_order_replay():
    sched = S.dualpipev(4, 8)
    assert simulate(S.lower(sched), COSTS) == simulate(sched, COSTS)


def test_lockstep_makespan_sums_the_slowest_rank_per_tick():
    tt = S.lower(S.gpipe(2, 2))  # ticks: F0 | F1 F0 | F1 | B0 | B1 B0 | B1  (one rank idle in 4)
    assert tt.ticks == 6
    assert lockstep_makespan(tt, COSTS) == 3 * F + 3 * B


def test_deadlocked_orders_are_reported():
    with pytest.raises(S.ScheduleError, match="deadlock: rank 0 waits at 0B0; rank 1 waits at 1F1"):
        simulate(S.loads("0F0,0B0,0F1,0B1\n1F1,1F0,1B0,1B1\n"), COSTS)


def test_timeline_png_is_written(tmp_path, capsys):
    out = tmp_path / "dv.png"
    assert (
        timeline_main(["--schedule", "dualpipev", "--stages", "4", "--microbatches", "8", "--out", str(out)])
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        timeline_main(["--schedule", "dualpipev", "--stages", "4", "--microbatches", "6", "--out", str(out)])
        == 2
    )
    assert "error: train.micro_batches=6" in capsys.readouterr().err
