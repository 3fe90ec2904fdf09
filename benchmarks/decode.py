"""Inference figures of the engine: prefill and decode throughput, latent-cache traffic, MTP.

    python benchmarks/decode.py --config model/toy --batches 1,8 --prompt-len 64 --new-tokens 32   # CPU
    python benchmarks/decode.py --config model/bench-1b --dtype bfloat16 --batches 1,32,256 \\
        --prompt-len 1024 --new-tokens 256                                                       # GPU
    python benchmarks/decode.py --checkpoint runs/toy --batches 4 --speculative                  # MTP

For each batch size B: B random prompts of --prompt-len tokens, --new-tokens greedy tokens
each (the model: random weights from --config, or a training run's --checkpoint).  One
untimed run compiles every program; the timed run reports
  prefill tok/s   prompt tokens / prefill time (chunked, expanded MLA)
  decode tok/s    generated tokens / decode time (absorbed MLA, sampling and host work included)
  cache read      latent bytes a decode step needs: sum over rows of cached tokens x
                  (L + D)(d_c + d_h^R) x itemsize (mean per step)
  weights read    parameter bytes in the compute dtype (an upper bound: all experts)
  bandwidth       (cache read + weights read) / decode step time
With --speculative (a model with MTP modules): acceptance rate and tokens per main forward.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frontier_jax.config import load_config
from frontier_jax.infer import Engine, InferConfig, SamplingParams
from frontier_jax.infer.cache import cache_bytes_per_token
from frontier_jax.model import Transformer
from frontier_jax.precision import get_policy


def build_engine(args, infer: InferConfig) -> Engine:
    if args.checkpoint:
        return Engine.from_checkpoint(args.checkpoint, dtype=args.dtype, infer=infer)
    cfg = load_config(args.config).model
    policy = get_policy({"float32": "fp32", "bfloat16": "bf16"}[args.dtype])
    model = Transformer(cfg, policy=policy, rngs=nnx.Rngs(0))
    return Engine(model, infer=infer)


def run(engine: Engine, prompts, params) -> tuple[dict, float]:
    for key in engine.stats:
        engine.stats[key] = 0
    start = time.perf_counter()
    engine.generate(prompts, params)
    return dict(engine.stats), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="model/toy")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--speculative", action="store_true")
    args = parser.parse_args()
    for batch in [int(b) for b in args.batches.split(",")]:
        infer = InferConfig(
            max_seqs=batch,
            max_len=args.prompt_len + args.new_tokens + 1,
            prefill_chunk=args.prefill_chunk,
            speculative="mtp" if args.speculative else "none",
        )
        engine = build_engine(args, infer)
        cfg = engine.cfg
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, min(cfg.vocab_size, 256), args.prompt_len).tolist() for _ in range(batch)]
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        run(engine, prompts, params)  # compiles
        stats, wall = run(engine, prompts, params)
        dtype = jnp.dtype(args.dtype)
        per_token = cache_bytes_per_token(cfg, dtype)
        steps = max(stats["decode_steps"], 1)
        cache_read = stats["decode_context"] * per_token / steps
        weights = sum(math.prod(x.shape) for x in jax.tree.leaves(engine.state)) * dtype.itemsize
        step_s = stats["decode_s"] / steps
        print(
            f"B={batch:4d}  prefill {stats['prompt_tokens'] / max(stats['prefill_s'], 1e-9):10,.0f} tok/s  "
            f"decode {stats['generated_tokens'] / max(stats['decode_s'], 1e-9):9,.0f} tok/s  "
            f"({step_s * 1e3:.2f} ms/step)  cache read {cache_read / 2**20:8.3f} MiB/step  "
            f"weights {weights / 2**20:8.1f} MiB  bandwidth {(cache_read + weights) / step_s / 1e9:7.2f} GB/s  "
            f"(wall {wall:.1f} s)"
        )
        if args.speculative:
            s = engine.speculative_stats
            print(
                f"        MTP: acceptance {s['acceptance_rate']:.1%}, {s['tokens_per_forward']:.2f} tokens per "
                f"forward ({s['accepted']}/{s['drafted']} drafts kept)"
            )


if __name__ == "__main__":
    main()
