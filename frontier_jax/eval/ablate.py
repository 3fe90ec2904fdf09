"""The ablation runner: named arms x seeds of one base training config, each trained and then
evaluated on held-out data, summarised over seeds.

    ablations/NAME.yaml
      base: train/toy                      # a config name or path
      overrides: [train.steps=120]         # applied to every run
      seeds: [0, 1, 2]                     # train.seed of each run (initialisation); data.seed is
                                           # the base's for every run: the same data order
      arms:                                # name -> overrides; the first arm is the reference
        mtp_on: [model.mtp_depth=1]
        mtp_off: [model.mtp_depth=0]
      metrics: [ce_loss, moe_load_max_over_mean]   # last-step training metrics also reported

    OUT/<arm>/seed-<s>/   the training run (checkpoints, metrics.jsonl) and result.json
    OUT/results.json      every run's figures and the summary; OUT/results.md the table
    OUT/curves.png        training CE per arm (mean over seeds, band = min..max)

`load_config(base, overrides)` (frontier_jax.config's, which sits above this package) is given by
the caller.  A run whose result.json exists is not re-run (an interrupted ablation resumes; a run interrupted
mid-training resumes from its checkpoint).  Per arm and figure: mean and sample standard
deviation s over the n seeds; an arm's difference to the reference, d = mean_a - mean_ref, is
said to exceed the seed noise when |d| > 2 sqrt(s_a^2 / n_a + s_ref^2 / n_ref) (two standard
errors of the difference; with n = 1 no noise estimate exists and nothing is claimed).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from frontier_jax.eval.model import load_checkpoint
from frontier_jax.eval.run import evaluate
from frontier_jax.train.loop import train
from frontier_jax.train.metrics import read_step_records

HELD_OUT = ("ce", "perplexity", "bits_per_byte")


@dataclasses.dataclass(frozen=True)
class Ablation:
    name: str
    base: str
    overrides: list[str]
    seeds: list[int]
    arms: dict[str, list[str]]
    metrics: list[str]


def load_ablation(path: str | Path, load_config: Callable) -> Ablation:
    """The ablation file, checked: errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(
            f"ablation config {path}: YAML syntax error{where}: {getattr(err, 'problem', None) or err}; fix the file"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping with base, seeds and arms")
    unknown = set(raw) - {"base", "overrides", "seeds", "arms", "metrics"}
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {sorted(unknown)}; allowed: base, overrides, seeds, arms, metrics"
        )
    for key in ("base", "seeds", "arms"):
        if not raw.get(key):
            raise ValueError(f"{path}: '{key}' is missing or empty (see frontier_jax/eval/ablate.py)")
    arms = raw["arms"]
    if not isinstance(arms, dict) or len(arms) < 2:
        raise ValueError(f"{path}: 'arms' must map at least two arm names to lists of overrides")
    for name, overrides in arms.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ValueError(f"{path}: arms.{name} must be a list of key=value overrides, got {overrides!r}")
    seeds = raw["seeds"]
    if (
        not isinstance(seeds, list)
        or not all(isinstance(s, int) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"{path}: 'seeds' must be a list of distinct integers, got {seeds!r}")
    ablation = Ablation(
        path.stem,
        str(raw["base"]),
        list(raw.get("overrides") or []),
        seeds,
        {str(k): list(v) for k, v in arms.items()},
        list(raw.get("metrics") or ["ce_loss"]),
    )
    for arm in ablation.arms:  # every run's config is valid before anything trains
        load_config(ablation.base, run_overrides(ablation, arm, seeds[0]))
    return ablation


def run_overrides(ablation: Ablation, arm: str, seed: int) -> list[str]:
    return ablation.overrides + ablation.arms[arm] + [f"train.seed={seed}"]


def _last_metrics(run_dir: Path, names: list[str]) -> dict:
    last = read_step_records(run_dir / "metrics.jsonl")[-1]
    return {name: float(np.mean(last[name])) for name in names if name in last}


def run_one(
    ablation: Ablation, arm: str, seed: int, out: Path, *, load_config: Callable, progress: bool
) -> dict:
    """Trains (or resumes) one run, evaluates its last checkpoint on cfg.eval.data; cached."""
    run_dir = out / arm / f"seed-{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(ablation.base, run_overrides(ablation, arm, seed))
    train(cfg, run_dir, progress=progress)
    model = load_checkpoint(str(run_dir), None, mesh=cfg.mesh, dtype=None)  # the training layout
    held_out = evaluate(model, cfg.eval, cfg.eval.data, progress=progress)["datasets"]
    result = {
        "arm": arm,
        "seed": seed,
        "step": model.step,
        "train": _last_metrics(run_dir, ablation.metrics),
        "held_out": {
            name: {k: figures[k] for k in HELD_OUT + ("tokens", "bytes")}
            for name, figures in held_out.items()
        },
    }
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(done)
    return result


def _figures(result: dict) -> dict[str, float]:
    out = {
        f"held_out/{name}/{k}": v[k]
        for name, v in result["held_out"].items()
        for k in HELD_OUT
        if k != "perplexity"
    }
    out.update({f"train/{k}": v for k, v in result["train"].items()})
    return out


def summarize(ablation: Ablation, results: list[dict]) -> dict:
    """{figure: {arm: {mean, std, n, diff, noise, exceeds_noise}}} (module docstring)."""
    by_arm = {arm: [_figures(r) for r in results if r["arm"] == arm] for arm in ablation.arms}
    reference = next(iter(ablation.arms))
    summary = {}
    for figure in by_arm[reference][0]:
        stats = {}
        for arm, runs in by_arm.items():
            values = np.asarray([r[figure] for r in runs if figure in r], np.float64)
            if not len(values):
                continue
            std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            stats[arm] = {"mean": float(values.mean()), "std": std, "n": len(values)}
        ref = stats[reference]
        for arm, s in stats.items():
            if arm == reference:
                continue
            s["diff"] = s["mean"] - ref["mean"]
            noise = 2 * math.sqrt(s["std"] ** 2 / s["n"] + ref["std"] ** 2 / ref["n"])
            s["noise"] = noise
            s["exceeds_noise"] = bool(abs(s["diff"]) > noise) if math.isfinite(noise) else None
        summary[figure] = stats
    return summary


def markdown_table(ablation: Ablation, summary: dict) -> str:
    arms = list(ablation.arms)
    reference = arms[0]
    head = ["figure"] + [f"{a} (mean ± std)" for a in arms] + [f"{a} − {reference}" for a in arms[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for figure, stats in summary.items():
        cells = [figure] + [
            f"{stats[a]['mean']:.4f} ± {stats[a]['std']:.4f}" if a in stats else "–" for a in arms
        ]
        for a in arms[1:]:
            s = stats.get(a, {})
            verdict = {True: "exceeds noise", False: "within noise", None: "no noise estimate"}[
                s.get("exceeds_noise")
            ]
            cells.append(f"{s['diff']:+.4f} (2σ {s['noise']:.4f}: {verdict})" if "diff" in s else "–")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(map(str, ablation.seeds))
    return (
        f"Ablation `{ablation.name}` ({len(ablation.seeds)} seeds: {seeds}; base {ablation.base})\n\n"
        + "\n".join(lines)
        + "\n"
    )


def plot_curves(ablation: Ablation, out: Path, metric: str = "ce_loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in ablation.arms:
        curves = []
        for seed in ablation.seeds:
            rows = read_step_records(out / arm / f"seed-{seed}" / "metrics.jsonl")
            curves.append([r[metric] for r in rows])
        length = min(map(len, curves))
        values = np.asarray([c[:length] for c in curves])
        steps = np.arange(1, length + 1)
        (line,) = ax.plot(steps, values.mean(0), label=arm)
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training {metric}")
    ax.set_title(f"ablation {ablation.name} (mean over {len(ablation.seeds)} seeds, band min..max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_ablation(path: str | Path, out: str | Path, *, load_config: Callable, progress: bool = True) -> dict:
    """Every arm x seed (cached runs skipped), then results.json, results.md and curves.png."""
    ablation = load_ablation(path, load_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [
        run_one(ablation, arm, seed, out, load_config=load_config, progress=progress)
        for arm in ablation.arms
        for seed in ablation.seeds
    ]
    summary = summarize(ablation, results)
    (out / "results.json").write_text(
        json.dumps({"ablation": dataclasses.asdict(ablation), "runs": results, "summary": summary}, indent=2)
    )
    table = markdown_table(ablation, summary)
    (out / "results.md").write_text(table)
    plot_curves(ablation, out)
    return {"summary": summary, "table": table, "runs": results}
