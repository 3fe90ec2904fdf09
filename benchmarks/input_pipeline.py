"""Input pipeline throughput per host, raw text vs prepared shards, next to what a train step consumes.

    python benchmarks/input_pipeline.py [--config train/toy] [--batches 200] [--repeats 3] [--workers 0 2]
        [--max-records 20000] [--prepared DIR] [--train-steps 6 | --train-tokens-per-s X] [key=value ...]

Prepares the config's sources (`frontier-jax data prepare`, into --prepared or a temporary
directory; --max-records caps each source, the generated math source needs it), then times
`build_train_iterator` over `--batches` global batches after one warm-up batch (which starts the
grain worker processes), for the raw sources and the prepared shards, with each `--workers` value
(`data.worker_count`: grain worker processes; 0 = in this process). Tokens/s = batches x
global_batch x seq_len / seconds, the median of `--repeats` fresh iterators. Every process builds the whole global batch (see
`frontier_jax/data/pipeline.py`), so this is the rate of one host.

The train step's tokens/s is global_batch x seq_len over the median step time of `--train-steps`
steps of the training loop (`frontier_jax.train.loop.train`, first step and compilation excluded,
on this machine's devices), or the figure given with --train-tokens-per-s (e.g. a GPU
measurement from benchmarks/RESULTS.md). Input keeps up when its tokens/s is above that.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

from frontier_jax.config import load_config
from frontier_jax.data import build_train_iterator
from frontier_jax.data.prepare import prepare, prepared_sources


def pipeline_tokens_per_s(data_cfg, seq_len: int, global_batch: int, batches: int) -> float:
    it = build_train_iterator(data_cfg, seq_len=seq_len, global_batch=global_batch)
    try:
        next(it)  # warm-up: worker processes start, buffers fill
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * global_batch * seq_len / (time.perf_counter() - start)
    finally:
        if hasattr(it, "close"):
            it.close()


def train_tokens_per_s(cfg, steps: int) -> float:
    from frontier_jax.train.loop import train

    cfg.train.steps, cfg.train.log_every, cfg.checkpoint.every = steps + 1, 1, 0
    with tempfile.TemporaryDirectory() as run_dir:
        history = train(cfg, run_dir, progress=False)
    seconds = statistics.median(r["step_time_s"] for r in history[1:])  # step 1 compiles
    return cfg.train.global_batch * cfg.train.seq_len / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="train/toy")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per iterator")
    parser.add_argument("--repeats", type=int, default=3, help="iterators timed per variant (median)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.worker_count values")
    parser.add_argument("--max-records", type=int, default=20_000, help="records prepared per source")
    parser.add_argument("--records-per-shard", type=int, default=2_000)
    parser.add_argument(
        "--prepared", default=None, help="prepared directory (kept; default: a temporary one)"
    )
    parser.add_argument("--train-steps", type=int, default=6, help="timed train steps (after the first)")
    parser.add_argument("--train-tokens-per-s", type=float, default=None, help="use this figure instead")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    seq_len, global_batch = cfg.train.seq_len, cfg.train.global_batch
    with tempfile.TemporaryDirectory() as tmp:
        out = args.prepared or os.path.join(tmp, "prepared")
        start = time.perf_counter()
        results = prepare(
            cfg.data,
            out,
            max_records=args.max_records,
            records_per_shard=args.records_per_shard,
            progress=False,
        )
        seconds = time.perf_counter() - start
        written = sum(s["tokens"] for r in results for s in r.manifest["shards"] if s["index"] in r.written)
        print(
            f"{args.config}: global batch {global_batch} x seq {seq_len} = {global_batch * seq_len} tokens; "
            f"{args.batches} batches timed after 1 warm-up, median of {args.repeats}; {os.cpu_count()} CPUs visible"
        )
        print(
            f"prepare ({args.max_records} records per source at most): "
            + ", ".join(
                f"{r.manifest['source']['name']} {sum(s['documents'] for s in r.manifest['shards']):,} documents"
                for r in results
            )
            + (
                f"; {written:,} tokens written in {seconds:.1f} s = {written / seconds:,.0f} tokens/s"
                if written
                else ""
            )
        )
        variants = {
            "raw": cfg.data,
            "prepared": dataclasses.replace(cfg.data, sources=prepared_sources(cfg.data, out)),
        }
        print(f"{'source':10} {'workers':>7} {'tokens/s':>12}")
        rates = {}
        for name, data_cfg in variants.items():
            for workers in args.workers:
                variant = dataclasses.replace(data_cfg, worker_count=workers)
                rate = statistics.median(
                    pipeline_tokens_per_s(variant, seq_len, global_batch, args.batches)
                    for _ in range(args.repeats)
                )
                rates[name, workers] = rate
                print(f"{name:10} {workers:>7} {rate:>12,.0f}", flush=True)
    if args.train_tokens_per_s is not None:
        train_rate, how = args.train_tokens_per_s, "given"
    else:
        train_rate = train_tokens_per_s(cfg, args.train_steps)
        how = f"median of {args.train_steps} steps after the first"
    print(f"train step: {train_rate:,.0f} tokens/s ({how})")
    for (name, workers), rate in rates.items():
        verdict = "keeps up" if rate >= train_rate else "too slow"
        print(f"  {name}, {workers} workers: {rate / train_rate:.1f}x the train step ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
