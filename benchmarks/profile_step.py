"""Profile a train step on the GPU and summarise where the time goes.

    python benchmarks/profile_step.py --config model/bench-1b --out DIR [key=value overrides ...]

Runs a few steps under `jax.profiler.trace(DIR)`, then reads the Chrome-format trace that the
profiler writes (`*.trace.json.gz`) and prints the device ops with the most total time per step
(GPU stream events), grouped by HLO op name with the fusion numbering stripped
(`--exact-names` keeps it, to look ops up in the optimized HLO that `--hlo FILE` writes),
after a summary per kernel family (CATEGORIES: fp8 quantization and GEMMs, grouped and cuBLAS
GEMMs, attention, row gathers, other).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

import jax

from frontier_jax.config import load_config
from frontier_jax.train.step import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import synthetic_batches  # noqa: E402


def run_steps(cfg, steps: int, out: Path, hlo: str | None = None) -> None:
    trainer = Trainer(cfg)
    state = jax.jit(trainer.init, static_argnums=0)(cfg.train.seed)
    batch = jax.device_put(
        synthetic_batches(cfg.model.vocab_size, cfg.train.global_batch, cfg.train.seq_len)[0]
    )
    step = jax.jit(trainer.train_step, donate_argnums=0)
    if hlo:
        Path(hlo).write_text(step.lower(state, batch).compile().as_text())
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    out.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(out)):
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)


def summarise(
    out: Path, steps: int, top: int, device_filter: str = "/device:GPU", exact_names: bool = False
) -> list[tuple[str, float, int]]:
    """(op name, ms per step, count per step) sorted by time, from the device streams."""
    trace_file = max(out.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    trace = json.loads(gzip.open(trace_file).read())
    processes = {
        e["pid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device_pids = {pid for pid, name in processes.items() if device_filter in name}
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for event in trace["traceEvents"]:
        if event.get("ph") == "X" and event.get("pid") in device_pids:
            name = event.get("name", "?")
            name = name if exact_names else re.sub(r"[._]\d+$", "", name)
            totals[name] += event.get("dur", 0) / 1e3
            counts[name] += 1
    rows = sorted(((n, ms / steps, counts[n] // steps) for n, ms in totals.items()), key=lambda r: -r[1])
    return rows[:top]


# Kernel families by device-op name (first match wins); everything else is "other".
CATEGORIES = [
    ("fp8 quantization (Pallas)", r"^fp8_quantize"),
    ("fp8 GEMMs (Mosaic GPU / Triton)", r"^anonymous_mosaic_gpu_kernel|^fp8_"),
    ("grouped GEMMs bf16 (Pallas)", r"^grouped_gemm"),
    ("cuBLAS / XLA GEMMs", r"^nvjet|^gemm_fusion|cublas|cutlass|xmma|gemm"),
    ("attention (cuDNN)", r"cudnn"),
    ("row gathers (dispatch / combine)", r"^loop_select_fusion"),
]


def by_category(rows: list[tuple[str, float, int]]) -> dict[str, float]:
    """ms per step summed per CATEGORIES entry (op rows from `summarise`)."""
    totals = collections.defaultdict(float)
    for name, ms, _ in rows:
        totals[next((c for c, pattern in CATEGORIES if re.search(pattern, name)), "other")] += ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="model/bench-1b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--exact-names", action="store_true", help="keep fusion numbers")
    parser.add_argument("--hlo", help="write the compiled step's optimized HLO here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(
        args.config,
        [
            "precision.policy=bf16",
            "model.mtp_depth=0",
            "train.seq_len=2048",
            "train.global_batch=16",
            *args.overrides,
        ],
    )
    out = Path(args.out)
    run_steps(cfg, args.steps, out, args.hlo)
    rows = summarise(out, args.steps, args.top, exact_names=args.exact_names)
    every = summarise(out, args.steps, 10**6)
    total = sum(ms for _, ms, _ in every)
    print(f"device time per step (sum over GPU stream events): {total:.1f} ms")
    for category, ms in by_category(every).items():
        print(f"  {category:40s} {ms:8.2f} ms {ms / total:6.1%}")
    print(f"{'op':70s} {'ms/step':>9s} {'share':>6s} {'calls':>6s}")
    for name, ms, count in rows:
        print(f"{name[:70]:70s} {ms:9.2f} {ms / total:6.1%} {count:6d}")


if __name__ == "__main__":
    main()
