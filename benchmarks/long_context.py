"""Context extension at toy scale: train the toy model on rows of 128 tokens, extend it to 512
with YaRN for a short second context stage, and compare three models on 512-token contexts:

    128       the 128-token checkpoint as trained (no RoPE scaling), extrapolating past 128
    128+YaRN  the same parameters under the extension stage's YaRN scaling, without training
    extended  the checkpoint after the extension stage (YaRN, trained on 512-token rows)

    python benchmarks/long_context.py --run-dir runs/long_context [--short-steps 300]
        [--long-steps 60] [--trials 40] [--plot docs/long_context.png] [--json FILE]

Training is one `frontier-jax train --config train/toy-long-context` run, the README's
context-stage example (configs/train/toy-long-context.yaml: the toy at 128 x 16 rows, cosine lr
3e-3 -> 3e-4 ending with the short stage; then 512 x 4 rows, the same tokens per step, YaRN
s = 4 from 128 with the V3 settings beta 32 / 1, mscale 1 / 1, at the constant lr 3e-4; other
--short-steps / --long-steps move the boundary and the cosine's end with it); running the script
again reuses the finished run.  Evaluation
(`frontier_jax.eval.long_context`): perplexity by position over windows of held-out Python
code (the standard library's sub-packages, which the embedded training data, its top-level
modules, leaves out) and passkey retrieval at several depths of a 512-token context.  Prints
the tables in Markdown and writes the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sysconfig

import numpy as np

from frontier_jax.config import load_config
from frontier_jax.data import load_tokenizer
from frontier_jax.eval.long_context import (
    nll_by_position,
    passkey_scores,
    passkey_trials,
    perplexity_by_bins,
    position_windows,
)
from frontier_jax.eval.scorer import Scorer
from frontier_jax.model.config import RopeScalingConfig
from frontier_jax.runtime.program import build_model_program
from frontier_jax.runtime.restore import restore_params
from frontier_jax.train.loop import train

CONFIG = "train/toy-long-context"  # the README's context-stage example
SHORT, LONG = 128, 512
YARN = RopeScalingConfig(
    type="yarn",
    factor=LONG / SHORT,
    original_max_position_embeddings=SHORT,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
BINS = [0, 64, 128, 192, 256, 320, 384, 448, 512]


def staged_config(short_steps: int, long_steps: int, overrides: list[str]):
    """configs/train/toy-long-context.yaml (300 + 60 steps) with its boundary at `short_steps`,
    the cosine ending there, and `long_steps` steps of the YaRN stage."""
    if short_steps % long_steps:
        raise ValueError(f"--short-steps {short_steps} must be a multiple of --long-steps {long_steps}")
    cfg = load_config(CONFIG, overrides)
    short, long = cfg.train.stages
    if (short.seq_len, long.seq_len, long.rope_scaling) != (SHORT, LONG, YARN):
        raise ValueError(f"{CONFIG}: its stages are not {SHORT} then {LONG} under {YARN}")
    short.until_step, long.until_step = short_steps, short_steps + long_steps
    cfg.train.steps = short_steps + long_steps
    cfg.train.decay_steps = short_steps - cfg.train.decay_start
    cfg.checkpoint.every = long_steps  # the two checkpoints compared
    return cfg.validate()


def held_out_code() -> list[str]:
    """Python sources of the standard library's sub-packages (the training data reads only its
    top-level modules), sorted by path; tests and site-packages left out."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings", "pydoc_data"}
    paths = sorted(
        p for p in stdlib.glob("*/*.py") if p.parent.name not in skip and not p.name.startswith("test")
    )
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def models(run_dir: pathlib.Path, short_steps: int, long_steps: int) -> dict:
    """name -> (program, params, biases) of the three models compared (module docstring)."""
    short = restore_params(run_dir, short_steps)
    long = restore_params(run_dir, short_steps + long_steps)
    if short.program.cfg.model.rope_scaling.type != "none" or long.program.cfg.model.rope_scaling != YARN:
        raise ValueError(f"{run_dir}: its checkpoints are not this script's stages; use a new --run-dir")
    yarn_cfg = dataclasses.replace(
        short.program.cfg, model=dataclasses.replace(short.program.cfg.model, rope_scaling=YARN)
    )
    yarn = build_model_program(yarn_cfg, mesh=short.program.mesh)
    return {
        f"{SHORT}": (short.program, short.params, short.biases),
        f"{SHORT}+YaRN": (yarn, short.params, short.biases),
        "extended": (long.program, long.params, long.biases),
    }


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ppl_ax, acc_ax, nll_ax) = plt.subplots(1, 3, figsize=(15, 4))
    width = 16
    centres = np.arange(0, LONG, width) + width / 2
    for (name, result), colour in zip(results.items(), ("C0", "C1", "C2")):
        nll = np.asarray(result["nll_by_position"])
        ppl_ax.plot(centres, np.exp(nll.reshape(-1, width).mean(axis=1)), color=colour, label=name)
        scores = [result["passkey"][str(d)] for d in DEPTHS]
        acc_ax.plot(DEPTHS, [s["accuracy"] for s in scores], "o-", color=colour, label=f"{name}: whole key")
        acc_ax.plot(
            DEPTHS, [s["token_accuracy"] for s in scores], "x--", color=colour, label=f"{name}: digits"
        )
        nll_ax.plot(DEPTHS, [s["nll"] for s in scores], "o-", color=colour, label=name)
    ppl_ax.axvline(SHORT, color="grey", linestyle=":", label=f"trained context {SHORT}")
    ppl_ax.set(
        xlabel="position", ylabel="perplexity (16-token bins)", title="held-out code, 512-token windows"
    )
    acc_ax.set(
        xlabel="passkey depth (0 = start of the context)", ylabel="greedy accuracy", ylim=(-0.05, 1.05)
    )
    acc_ax.set_title("passkey retrieval, 512-token context")
    nll_ax.axhline(np.log(10), color="grey", linestyle=":", label="ln 10 (a digit at random)")
    nll_ax.set(xlabel="passkey depth (0 = start of the context)", ylabel="-log p per passkey digit (nats)")
    nll_ax.set_title("passkey likelihood")
    for ax in (ppl_ax, acc_ax, nll_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def print_tables(results: dict, windows: int, trials: int) -> None:
    print(f"\nperplexity by position ({windows} windows of held-out code)\n")
    print("| model | " + " | ".join(f"{a}-{b}" for a, b in zip(BINS[:-1], BINS[1:])) + " |")
    print("| --- |" + " ---: |" * (len(BINS) - 1))
    for name, result in results.items():
        print(f"| {name} | " + " | ".join(f"{p:.2f}" for p in result["perplexity_bins"]) + " |")
    print(f"\npasskey: whole-key accuracy / digit accuracy / -log p per digit ({trials} trials per depth)\n")
    print("| model | " + " | ".join(f"depth {d}" for d in DEPTHS) + " |")
    print("| --- |" + " ---: |" * len(DEPTHS))
    for name, result in results.items():
        cells = [result["passkey"][str(d)] for d in DEPTHS]
        print(
            f"| {name} | "
            + " | ".join(f"{c['accuracy']:.2f} / {c['token_accuracy']:.2f} / {c['nll']:.2f}" for c in cells)
            + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=pathlib.Path, default=pathlib.Path("runs/long_context"))
    parser.add_argument("--short-steps", type=int, default=300)
    parser.add_argument("--long-steps", type=int, default=60)
    parser.add_argument("--trials", type=int, default=40, help="passkey trials per depth")
    parser.add_argument(
        "--windows", type=int, default=0, help="held-out windows (0 = one per long enough file)"
    )
    parser.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("docs/long_context.png"))
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args()

    cfg = staged_config(args.short_steps, args.long_steps, args.overrides)
    train(cfg, args.run_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.special_tokens)
    windows = position_windows(tokenizer, held_out_code(), LONG, seed=0)
    windows = windows[: args.windows] if args.windows else windows
    probes = {d: passkey_trials(tokenizer, length=LONG, depth=d, trials=args.trials, seed=1) for d in DEPTHS}

    results = {}
    for name, (program, params, biases) in models(args.run_dir, args.short_steps, args.long_steps).items():
        scorer = Scorer(program, params, biases, context=LONG, batch_size=8, pad_id=tokenizer.pad_id)
        nll = nll_by_position(scorer, windows)
        results[name] = {
            "nll_by_position": nll.tolist(),
            "perplexity_bins": perplexity_by_bins(nll, BINS),
            "passkey": {str(d): passkey_scores(scorer, probes[d]) for d in DEPTHS},
        }

    print_tables(results, len(windows), args.trials)
    plot(results, args.plot)
    print(f"\nwrote {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"windows": len(windows), "trials": args.trials, "results": results}))


if __name__ == "__main__":
    main()
