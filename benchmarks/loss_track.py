"""Does a precision policy track bf16's loss?  The same model, seed and batches under several
policies, one after another in one process.

    python benchmarks/loss_track.py --config model/bench-moonlight-4l --steps 200 \
        --policies bf16,fp8_deepseek,fp32 [--json FILE] [key=value overrides ...]

The batches are the embedded default data (`data` config), drawn once and replayed for every
policy, so each run sees the same tokens in the same order from the same initial weights.
Prints, per policy, the CE loss every `--every` steps, and against the first policy (the
reference, bf16): the mean relative difference |L_p - L_ref| / L_ref over all steps and over
the last `--window` steps, and the difference of the window-mean losses.  bf16 against fp32
is the noise floor: what a change of rounding alone moves.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from frontier_jax.config import load_config
from frontier_jax.train.batches import data_iterator
from frontier_jax.train.loop import build_runner


def run_policy(config: str, overrides: list[str], policy: str, batches: list[dict]) -> dict:
    """CE loss per step and median step time (after the first) of `policy` over `batches`."""
    cfg = load_config(config, [*overrides, f"precision.policy={policy}"])
    runner = build_runner(cfg)
    state = runner.init(cfg.train.seed)
    spec = runner.trainer.objective.batch_spec  # the step's batch keys and dtypes
    losses, times = [], []
    for batch in tqdm(batches, desc=policy, unit="step", dynamic_ncols=True):
        batch = jax.device_put(
            {k: np.asarray(batch[k], dtype) for k, dtype in spec.items()}, runner.batch_sharding
        )
        t = time.perf_counter()
        state, metrics = runner.step(state, batch)
        loss = float(metrics["ce_loss"])  # waits for the step
        times.append(time.perf_counter() - t)
        if not np.isfinite(loss):
            raise FloatingPointError(f"{policy}: CE loss {loss} at step {len(losses) + 1}")
        losses.append(loss)
    del state, runner
    gc.collect()
    return {"policy": policy, "ce_loss": losses, "median_step_ms": statistics.median(times[1:]) * 1e3}


def compare(run: dict, ref: dict, window: int) -> dict:
    got, want = np.asarray(run["ce_loss"]), np.asarray(ref["ce_loss"])
    rel = np.abs(got - want) / want
    return {
        "mean_rel_diff": float(rel.mean()),
        "last_window_rel_diff": float(rel[-window:].mean()),
        "last_window_loss": float(got[-window:].mean()),
        "window_mean_diff": float(got[-window:].mean() - want[-window:].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="model/bench-moonlight-4l")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--policies",
        default="bf16,fp8_deepseek,fp32",
        help="comma-separated precision policies; the first is the reference",
    )
    parser.add_argument("--every", type=int, default=25, help="print the loss every N steps")
    parser.add_argument("--window", type=int, default=20, help="steps averaged at the end")
    parser.add_argument("--json", help="write the losses and comparisons to this JSON file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    overrides = ["model.mtp_depth=0", f"train.steps={args.steps}", *args.overrides]
    cfg = load_config(args.config, overrides)
    data = data_iterator(cfg)
    batches = [dict(b) for b in itertools.islice(data, args.steps)]
    print(
        f"{cfg.model.name}: {args.steps} steps of {cfg.train.global_batch} x {cfg.train.seq_len} tokens "
        f"(embedded data), lr {cfg.train.lr}, device {jax.devices()[0].device_kind}",
        flush=True,
    )
    runs = []
    for policy in args.policies.split(","):
        try:
            runs.append(run_policy(args.config, overrides, policy, batches))
        except Exception as e:  # noqa: BLE001 - a policy that cannot run must not lose the others
            print(f"{policy}: FAILED: {str(e).strip().splitlines()[0][:300]}", flush=True)
            continue
        report(runs, cfg, args)  # after every policy: a run cut short keeps what finished


def report(runs: list[dict], cfg, args) -> None:
    """Prints the loss table and the comparisons with runs[0]; writes --json."""
    steps = sorted({*range(args.every - 1, args.steps, args.every), args.steps - 1})
    print(f"{'step':>6s} " + " ".join(f"{r['policy']:>14s}" for r in runs))
    for s in steps:
        print(f"{s + 1:6d} " + " ".join(f"{r['ce_loss'][s]:14.4f}" for r in runs))
    ref = runs[0]
    out = {
        "config": cfg.model.name,
        "steps": args.steps,
        "batch": cfg.train.global_batch,
        "seq_len": cfg.train.seq_len,
        "runs": runs,
        "against": ref["policy"],
        "comparisons": {},
    }
    for run in runs[1:]:
        c = compare(run, ref, args.window)
        out["comparisons"][run["policy"]] = c
        print(
            f"{run['policy']} vs {ref['policy']}: mean |dL|/L {c['mean_rel_diff']:.2e} over all steps, "
            f"{c['last_window_rel_diff']:.2e} over the last {args.window}; window-mean loss "
            f"{c['last_window_loss']:.4f} ({c['window_mean_diff']:+.4f})"
        )
    for run in runs:
        print(f"{run['policy']}: median step {run['median_step_ms']:.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
