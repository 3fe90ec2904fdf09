"""Trains the toy model with two precision policies on the same data, seed and schedule and
compares their final losses (mean `loss` of the last `WINDOW` steps).

    python -m tests.precision.fp8_vs_bf16 --json out.json --plot docs/fp8_vs_bf16.png

(the docs plot, on one CPU device: jax's default; `test_fp8_training.py` runs the same).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

WINDOW = 20
POLICIES = ("bf16", "fp8_deepseek")


def train_losses(
    policy: str, run_dir: Path, *, steps: int, seq_len: int = 64, batch: int = 8, seed: int = 0
) -> list[float]:
    """Per-step training loss of the toy config under `policy` (checkpointing only at the end)."""
    from frontier_jax.config import load_config
    from frontier_jax.train.loop import train

    cfg = load_config(
        "train/toy",
        [
            f"precision.policy={policy}",
            f"train.steps={steps}",
            f"train.seq_len={seq_len}",
            f"train.global_batch={batch}",
            f"train.seed={seed}",
            "checkpoint.every=0",
        ],
    )
    return [record["loss"] for record in train(cfg, run_dir, progress=False)]


def final_loss(losses: list[float]) -> float:
    return float(np.mean(losses[-WINDOW:]))


def plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """Loss curves (top) and each policy's per-step loss relative to the first one's (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    base = np.asarray(next(iter(curves.values())))
    steps = np.arange(1, len(base) + 1)
    for policy, losses in curves.items():
        top.plot(steps, losses, label=f"{policy} (last {WINDOW}: {final_loss(losses):.4f})", linewidth=1)
    for policy, losses in list(curves.items())[1:]:
        bottom.plot(steps, 100 * (np.asarray(losses) / base - 1), label=policy, linewidth=1)
    bottom.axhspan(-0.25, 0.25, color="grey", alpha=0.2, label="+-0.25%")
    top.set(ylabel="training loss (CE + 0.3 MTP)", yscale="log", title=title)
    bottom.set(xlabel="step", ylabel=f"% vs {next(iter(curves))}")
    top.legend()
    bottom.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    run = dict(steps=args.steps, seq_len=args.seq_len, batch=args.batch, seed=args.seed)
    with tempfile.TemporaryDirectory() as root:
        curves = {p: train_losses(p, Path(root) / p, **run) for p in args.policies}
    args.json.write_text(json.dumps(curves))
    if args.plot:
        plot(
            curves,
            args.plot,
            f"toy model, {args.steps} steps of seq {args.seq_len} x batch {args.batch}, seed {args.seed}",
        )


if __name__ == "__main__":
    main()
