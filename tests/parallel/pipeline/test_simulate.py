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
