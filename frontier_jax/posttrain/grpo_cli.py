"""`frontier-jax grpo`: GRPO on the in-process engine.

    frontier-jax grpo --config posttrain/grpo-toy --run-dir DIR train.init_from=RUN [key=value ...]

`train.loop.train` with the GRPO objective (`train/objectives/grpo.py`) and the rollout batch
source (`posttrain/grpo.py`): checkpoints, metrics.jsonl, TensorBoard, loss.png and resume as in
training, plus `grpo.png` (reward and held-out accuracy over steps).  Held-out evaluation runs
every eval.every steps (greedy, `grpo.held_out`).
"""

from __future__ import annotations

from pathlib import Path


def plot_grpo(metrics_path: Path, out_path: Path) -> None:
    """Mean reward per step and held-out accuracy (where evaluated) from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from frontier_jax.train.metrics import read_step_records

    by_step = {r["step"]: r for r in read_step_records(metrics_path)}
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (
        ("grpo/reward_mean", "reward (rollouts)"),
        ("eval/accuracy", "held-out accuracy (greedy)"),
    ):
        steps = [s for s in sorted(by_step) if key in by_step[s]]
        if steps:
            ax.plot(
                steps,
                [by_step[s][key] for s in steps],
                marker="o" if key.startswith("eval") else None,
                label=label,
            )
    ax.set_xlabel("step")
    ax.set_title(f"GRPO ({Path(metrics_path).parent.name})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def run_grpo(cfg, run_dir: str | Path, *, progress: bool = True) -> list[dict]:
    """Trains `cfg` with GRPO in `run_dir` (or resumes); returns the logged metrics."""
    import jax

    from frontier_jax.data import load_tokenizer
    from frontier_jax.data.template import ChatTemplate
    from frontier_jax.posttrain.grpo import Rollouts
    from frontier_jax.posttrain.rewards import RewardSet
    from frontier_jax.train.loop import train
    from frontier_jax.train.objectives.grpo import GRPO

    objective = GRPO(cfg.grpo, cfg.model)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.special_tokens)
    template = ChatTemplate.of_tokenizer(cfg.data.tokenizer)
    with RewardSet(cfg.grpo.rewards_config(), strict_lengths=True) as rewards:
        rollouts = Rollouts(cfg.grpo, cfg.train, cfg.infer, rewards, tokenizer, template)
        evaluate = rollouts.evaluator() if cfg.eval.every else None
        history = train(
            cfg, run_dir, progress=progress, objective=objective, batches=rollouts, evaluate=evaluate
        )
    metrics = Path(run_dir) / "metrics.jsonl"
    if history and jax.process_index() == 0 and metrics.exists():
        plot_grpo(metrics, Path(run_dir) / "grpo.png")
    return history


def add_grpo_parser(sub, run) -> None:
    """The `grpo` subcommand; run(args) -> exit code (the CLI's, which sets up logging and signals)."""
    grpo = sub.add_parser(
        "grpo",
        help="GRPO: sample G completions per prompt with the in-process engine, score them, train the policy "
        "(resumes from --run-dir if it has checkpoints)",
    )
    grpo.add_argument(
        "--config", required=True, help="YAML path or name under configs/, e.g. posttrain/grpo-toy"
    )
    grpo.add_argument("--run-dir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, grpo.png")
    grpo.add_argument("--verbose", action="store_true", help="also print the libraries' INFO logs")
    grpo.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.init_from=runs/sft grpo.beta=0.04"
    )
    grpo.set_defaults(func=run)
