"""The figures of `benchmarks/posttrain_demo.sh`: RUNS_DIR/summary.md and RUNS_DIR/grpo_demo.png.

    python benchmarks/posttrain_summary.py RUNS_DIR

- every evaluation in RUNS_DIR/results/*/results.json: greedy exact match, format rate, pass@1,
  pass@8 and spread per level; a reward model's held-out pairwise accuracy;
- GRPO over its seeds (runs grpo-s*): per level and figure the mean and its 95% t-interval over
  seeds, mean +- t_{0.975, n-1} s / sqrt(n) (s the sample standard deviation);
- per GRPO run (metrics.jsonl): samples and sampled completion tokens (sum over steps of
  train.global_batch x grpo/completion_len_mean), the rollout reward's mean over the first and last
  25 steps, held-out greedy accuracy at each evaluation, the rollout/trainer gap (mean over steps of
  grpo/gap_mean, max of grpo/gap_max);
- grpo_demo.png: the rollout reward (10-step running mean) and held-out accuracy over steps.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

from frontier_jax.train.metrics import read_step_records

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
FIGURES = ("exact_match", "format_rate", "pass@1", "pass@8", "spread")


def evaluation_rows(runs: Path) -> list[str]:
    lines = [
        "| model | level | greedy exact match | format rate | pass@1 | pass@8 | spread |",
        "| --- " * 7 + "|",
    ]
    for path in sorted((runs / "results").glob("*/results.json")):
        results = json.loads(path.read_text())
        for level, t in results.get("tasks", {}).items():
            figures = " | ".join(f"{t[k]:.3f}" for k in FIGURES)
            lines.append(f"| {path.parent.name} | {level} ({t['rows']} rows) | {figures} |")
        if "preferences" in results:
            p = results["preferences"]
            lines.append(
                f"\n{path.parent.name}: held-out pairwise accuracy {p['accuracy']:.3f} over {p['pairs']} pairs"
            )
    return lines


def interval(values: list[float]) -> str:
    """mean +- the 95% t-interval's half-width over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    half = T_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.3f} ± {half:.3f}"


def grpo_seed_rows(runs: Path) -> list[str]:
    seeds = sorted((runs / "results").glob("grpo-s*/results.json"))
    if not seeds:
        return []
    results = [json.loads(p.read_text())["tasks"] for p in seeds]
    lines = [
        f"\nGRPO over {len(seeds)} seeds ({', '.join(p.parent.name for p in seeds)}): mean ± 95% t-interval",
        "| level | greedy exact match | format rate | pass@1 | pass@8 | spread |",
        "| --- " * 6 + "|",
    ]
    for level in results[0]:
        cells = " | ".join(interval([r[level][k] for r in results]) for k in FIGURES)
        lines.append(f"| {level} | {cells} |")
    return lines


def grpo_run_rows(runs: Path) -> list[str]:
    found = sorted(p for p in runs.glob("*/metrics.jsonl") if "grpo/reward_mean" in p.read_text()[:4000])
    if not found:
        return []
    lines = [
        "\n| GRPO run | steps | samples | sampled tokens | reward, first 25 steps | reward, last 25 | held-out greedy accuracy by step | gap mean | gap max |",
        "| --- " * 9 + "|",
    ]
    for path in found:
        run, rows = path.parent, read_step_records(path)
        config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
        batch = config["train"]["global_batch"]
        tokens = sum(batch * r["grpo/completion_len_mean"] for r in rows)
        reward = [r["grpo/reward_mean"] for r in rows]
        held_out = ", ".join(f"{r['step']}: {r['eval/accuracy']:.3f}" for r in rows if "eval/accuracy" in r)
        gaps = [r["grpo/gap_mean"] for r in rows if "grpo/gap_mean" in r]
        gap_max = max(r["grpo/gap_max"] for r in rows if "grpo/gap_max" in r)
        lines.append(
            f"| {run.name} ({config['precision']['policy']}, replay {config['grpo']['routing_replay']}) | "
            f"{rows[-1]['step']} | {batch * len(rows):,} | {tokens:,.0f} | {statistics.fmean(reward[:25]):.3f} | "
            f"{statistics.fmean(reward[-25:]):.3f} | {held_out or '-'} | {statistics.fmean(gaps):.1e} | {gap_max:.1e} |"
        )
    return lines


def plot_grpo_runs(runs: Path, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = sorted(p.parent for p in runs.glob("grpo-*/metrics.jsonl"))
    if not found:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in found:
        rows = read_step_records(run / "metrics.jsonl")
        steps = [r["step"] for r in rows]
        reward = [r["grpo/reward_mean"] for r in rows]
        smooth = [statistics.fmean(reward[max(0, i - 9) : i + 1]) for i in range(len(reward))]
        (line,) = left.plot(steps, smooth, label=run.name)
        evaluated = [r for r in rows if "eval/accuracy" in r]
        right.plot([r["step"] for r in evaluated], [r["eval/accuracy"] for r in evaluated], "o-",
                   color=line.get_color(), label=run.name)  # fmt: skip
    left.set(
        xlabel="step",
        ylabel="rollout reward (10-step running mean)",
        title="GRPO: reward on training prompts",
    )
    right.set(xlabel="step", ylabel="held-out greedy accuracy", title="GRPO: held-out questions")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main(runs: Path) -> None:
    lines = evaluation_rows(runs) + grpo_seed_rows(runs) + grpo_run_rows(runs)
    if plot_grpo_runs(runs, runs / "grpo_demo.png"):
        lines.append(f"\ncurves: {runs / 'grpo_demo.png'}")
    summary = "\n".join(lines) + "\n"
    (runs / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
