"""Training curves of several run directories on one plot, with the figures that tell them apart.

    python benchmarks/compare_runs.py --run "in order=runs/before" --run "shuffled=runs/after" \
        --out docs/demo_shuffle.png [--metric ce_loss] [--after 100]

Reads each RUN_DIR/metrics.jsonl (the last record of a step, as a resumed run may log a step
twice) and prints, per run: the metric at the first step, the mean over the last 20 steps, and
after step `--after`, the largest value and the standard deviation of the step-to-step change
(how jumpy the curve is).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from frontier_jax.train.metrics import read_step_records


def read_curve(run_dir: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric` in run_dir/metrics.jsonl."""
    by_step = {r["step"]: r[metric] for r in read_step_records(run_dir / "metrics.jsonl") if metric in r}
    steps = np.array(sorted(by_step))
    return steps, np.array([by_step[s] for s in steps], np.float64)


def figures(steps: np.ndarray, values: np.ndarray, after: int) -> dict[str, float]:
    late = values[steps > after]
    return {
        "first": float(values[0]),
        "last20_mean": float(values[-20:].mean()),
        f"max_after_{after}": float(late.max()),
        f"step_change_std_after_{after}": float(np.diff(late).std()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--metric", default="ce_loss")
    parser.add_argument("--after", type=int, default=100, help="step after which jumps are measured")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for spec in args.run:
        label, _, run_dir = spec.partition("=")
        steps, values = read_curve(Path(run_dir), args.metric)
        print(label, json.dumps({k: round(v, 3) for k, v in figures(steps, values, args.after).items()}))
        ax.plot(steps, values, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(args.metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
