"""Draw a simulated schedule as one timeline row per rank (DeepSeek-V3 Figure 5 style).

``python -m frontier_jax.parallel.pipeline.timeline --schedule dualpipev --stages 4
--microbatches 10 --out dualpipev.png`` writes a PNG; each box is one pass, labelled with its
micro-batch, coloured by op (F, B, I, W; an FB box is split: forward half, backward half) and
shaded darker for the second chunk of a rank. Costs come from ``--costs F,B,W,FB``.
"""

from __future__ import annotations

import argparse
import sys

from frontier_jax.parallel.pipeline.schedule import Op, ScheduleError, ScheduleName, build
from frontier_jax.parallel.pipeline.simulate import Costs, Simulation, simulate

_COLOURS = {Op.F: "#f6c85f", Op.B: "#6fb07f", Op.I: "#8cc5e3", Op.W: "#a98ed6"}


def plot(sim: Simulation, path: str, title: str | None = None) -> None:
    """Write the timeline of ``sim`` to ``path`` (any format matplotlib saves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    s = sim.schedule
    fig, ax = plt.subplots(figsize=(max(6.0, sim.makespan / sim.costs.F * 0.35), 0.5 * s.ranks + 1.2))
    for iv in sim.intervals:
        parts = iv.action.parts()
        width = (iv.end - iv.start) / len(parts)
        for k, (op, chunk, mb) in enumerate(parts):
            second = s.local_index(chunk) > 0
            ax.barh(
                iv.rank,
                width,
                left=iv.start + k * width,
                height=0.8,
                color=_COLOURS[op],
                edgecolor="black",
                linewidth=0.5,
                alpha=0.65 if second else 1.0,
                hatch="//" if second else None,
            )
            ax.text(iv.start + (k + 0.5) * width, iv.rank, str(mb), ha="center", va="center", fontsize=7)
        if iv.action.op == Op.FB:  # one overlapped step: a heavy frame around both halves
            ax.barh(iv.rank, iv.end - iv.start, left=iv.start, height=0.8, fill=False, linewidth=2.0)
    ax.set_yticks(range(s.ranks), [f"rank {r}" for r in range(s.ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, sim.makespan)
    ax.set_xlabel("time (cost units)")
    legend = [Patch(color=c, label=op.name) for op, c in _COLOURS.items()]
    legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="second chunk"))
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(legend), fontsize=8)
    ax.set_title(
        title
        or f"{s.name}: {s.ranks} ranks, {s.microbatches} micro-batches, bubble {sim.bubble_fraction:.1%}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", required=True, choices=[s.value for s in ScheduleName])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--costs", default="1,2,1,2.5", help="F,B,W,FB durations of one chunk")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        f, b, w, fb = (float(x) for x in args.costs.split(","))
    except ValueError:
        print(f"error: --costs={args.costs!r}: give four numbers F,B,W,FB, e.g. 1,2,1,2.5", file=sys.stderr)
        return 2
    try:
        sim = simulate(build(args.schedule, args.stages, args.microbatches), Costs(f, b, w, fb))
    except ScheduleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot(sim, args.out)
    print(
        f"{args.out}: makespan {sim.makespan:g}, bubble {sim.bubble_fraction:.1%}, peak live {max(sim.peak_live)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
