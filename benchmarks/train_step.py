"""Full training-step benchmark: frontier_jax vs Hugging Face transformers (PyTorch), same run.

    python benchmarks/train_step.py --config model/bench-1b --seq-len 2048 --batch 16 \
        [--torch] [--torch-compile] [--variant NAME:key=value,key=value ...] [key=value overrides ...]

Prints, for each system: median step time, tokens/s, MFU (model FLOPs per token from
`describe` -- 6 N_active + causal attention -- over the device's measured bf16 peak, or
`--peak-tflops`) and peak device memory, then the ratio of ours to each baseline.  Each
`--variant` is one more frontier_jax configuration (the overrides after the colon on top of the
common ones) timed in the same process; its memory is XLA's compiled footprint (arguments +
outputs + temporaries - donated aliases; the JSON adds the process-wide runtime peak).
Synthetic uniform-random token batches, so the input pipeline is not part of the figure.  Both sides train the same shape without MTP
(transformers' DeepseekV3 has no MTP module) unless `model.mtp_depth` is overridden.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

# PyTorch runs in the same process: JAX must not reserve most of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

from frontier_jax.config import load_config
from frontier_jax.model.describe import describe
from frontier_jax.train.metrics import peak_flops_per_device
from frontier_jax.train.step import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_peer import hf_peer_model  # noqa: E402
from synthetic import synthetic_batches  # noqa: E402


def _report(
    name: str,
    times: list[float],
    tokens: int,
    flops_per_token: float,
    peak_bytes: int | None,
    peak: float | None,
):
    median = statistics.median(times)
    tps = tokens / median
    row = {
        "system": name,
        "median_step_ms": median * 1e3,
        "tokens_per_s": tps,
        "mfu": flops_per_token * tps / peak if peak else None,
        "peak_memory_gib": peak_bytes / 2**30 if peak_bytes else None,
    }
    mfu = f"{row['mfu'] * 100:.1f}%" if row["mfu"] is not None else "n/a"
    mem = f"{row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else "n/a"
    print(
        f"{name:40s} step {median * 1e3:8.1f} ms  {tps:12,.0f} tok/s  MFU {mfu:>6s}  peak mem {mem}",
        flush=True,
    )
    return row


def compiled_footprint(compiled) -> int | None:
    """Bytes XLA plans for one call: arguments + outputs + temporaries - donated aliases."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )


def bench_jax(cfg, batch: int, seq: int, steps: int, warmup: int) -> tuple[list[float], int | None]:
    """Median-able step times after compile + warm-up, and the compiled step's footprint."""
    trainer = Trainer(cfg)
    state = jax.jit(trainer.init, static_argnums=0)(cfg.train.seed)
    device_batch = jax.device_put(synthetic_batches(cfg.model.vocab_size, batch, seq)[0])
    t = time.perf_counter()
    step = jax.jit(trainer.train_step, donate_argnums=0).lower(state, device_batch).compile()
    footprint = compiled_footprint(step)
    state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    print(
        f"jax compile + first step: {time.perf_counter() - t:.1f} s (loss {float(metrics['loss']):.3f})",
        flush=True,
    )
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = step(state, device_batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    del state, metrics, step
    gc.collect()
    return times, footprint


def bench_torch(
    cfg, batch: int, seq: int, steps: int, warmup: int, compile_model: bool
) -> tuple[list[float], int]:
    import torch

    model, device = hf_peer_model(cfg.model, torch.bfloat16)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda"
    )
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq), device=device)

    def train_step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    step = torch.compile(train_step) if compile_model else train_step
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps + 1):
        t = time.perf_counter()
        step()
        sync()
        if i > warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    model = opt = step = None  # drop the references (the closure sees the cells) before JAX runs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return times, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="model/bench-1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--torch", action="store_true", help="also run transformers eager")
    parser.add_argument("--torch-compile", action="store_true", help="also run transformers + torch.compile")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:key=value,key=value -- one more frontier_jax run (repeatable)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="bf16 peak for MFU (default: the measured figure of train.metrics.PEAK_FLOPS)",
    )
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    overrides = [
        "precision.policy=bf16",
        "model.mtp_depth=0",
        f"train.seq_len={args.seq_len}",
        f"train.global_batch={args.batch}",
        *args.overrides,
    ]
    variants = [_parse_variant(v) for v in args.variant] or [("frontier_jax", [])]
    cfg = load_config(args.config, overrides)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_per_device()
    info = describe(cfg.model, args.seq_len)
    tokens = args.batch * args.seq_len
    print(
        f"model {cfg.model.name}: "
        f"{info['active_non_embedding_params'] / 1e6:.1f}M active non-embedding params, "
        f"{info['flops_per_token'] / 1e9:.3f} GFLOP/token; batch {args.batch} x seq {args.seq_len}; "
        f"MFU against {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s",
        flush=True,
    )
    baselines = []
    for name, enabled, compiled in (
        ("transformers eager", args.torch, False),
        ("transformers torch.compile", args.torch_compile, True),
    ):
        if enabled:  # before JAX touches the GPU, so that each side has the whole memory
            t, peak_bytes = bench_torch(cfg, args.batch, args.seq_len, args.steps, args.warmup, compiled)
            baselines.append(_report(name, t, tokens, info["flops_per_token"], peak_bytes, peak))
    ours = []
    for name, extra in variants:
        vcfg = load_config(args.config, overrides + extra)
        m = vcfg.impl
        print(
            f"{name}: precision {vcfg.precision.policy}, attention {m.attention}, dispatch "
            f"{m.moe_dispatch}, gmm {m.gmm}, gmm_gather {m.gmm_gather}, remat {m.remat}, scan_layers {m.scan_layers}",
            flush=True,
        )
        try:
            times, footprint = bench_jax(vcfg, args.batch, args.seq_len, args.steps, args.warmup)
        except Exception as e:  # noqa: BLE001 - one variant out of memory must not end the run
            print(f"{name}: FAILED: {str(e).strip().splitlines()[0][:300]}", flush=True)
            ours.append({"system": name, "failed": str(e)[:2000]})
            continue
        runtime_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        row = _report(name, times, tokens, info["flops_per_token"], footprint, peak)
        row["process_peak_memory_gib"] = runtime_peak / 2**30 if runtime_peak else None
        ours.append(row)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
    rows = ours + baselines
    for row in ours:
        for base in baselines:
            if "tokens_per_s" in row:
                print(
                    f"{row['system']} / {base['system']}: {row['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": cfg.model.name,
                    "batch": args.batch,
                    "seq_len": args.seq_len,
                    "peak_flops": peak,
                    "rows": rows,
                },
                f,
                indent=1,
            )


def _parse_variant(text: str) -> tuple[str, list[str]]:
    """ "NAME:key=value,key=value" -> (NAME, [key=value, ...])."""
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


if __name__ == "__main__":
    main()
