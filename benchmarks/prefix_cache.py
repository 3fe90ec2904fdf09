"""Time to first token with and without the prefix cache on prompts that share a prefix.

    python benchmarks/prefix_cache.py --config model/toy --prefix-len 1024 --suffix-len 64 --requests 8

--requests prompts of one random --prefix-len-token prefix and a random --suffix-len-token suffix
each are submitted one after another (each runs alone to its first token: max_new_tokens=1);
time to first token = wall time of that request.  The model has random weights from --config.
Both engines (infer.prefix_cache on, off) first run the same number of prompts of another prefix,
untimed, so every program is compiled and the timed prompts' prefix is not cached yet: the first
timed prompt misses, the others find the prefix's full blocks.  Reported per engine: median and
mean time to first token, prompt tokens prefilled and the cache's hit rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from flax import nnx

from frontier_jax.config import load_config
from frontier_jax.infer import Engine, InferConfig, SamplingParams
from frontier_jax.model import Transformer


def shared_prefix_prompts(
    rng, vocab: int, requests: int, prefix_len: int, suffix_len: int
) -> list[list[int]]:
    prefix = rng.integers(0, vocab, prefix_len).tolist()
    return [prefix + rng.integers(0, vocab, suffix_len).tolist() for _ in range(requests)]


def first_token_seconds(engine: Engine, prompts) -> list[float]:
    params = SamplingParams(max_new_tokens=1)
    seconds = []
    for prompt in prompts:
        start = time.perf_counter()
        engine.generate([prompt], params)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="model/toy")
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    args = parser.parse_args()
    cfg = load_config(args.config).model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    vocab = min(cfg.vocab_size, 256)
    rng = np.random.default_rng(0)
    warm_up = shared_prefix_prompts(rng, vocab, args.requests, args.prefix_len, args.suffix_len)
    timed = shared_prefix_prompts(rng, vocab, args.requests, args.prefix_len, args.suffix_len)
    for enabled in (False, True):
        infer = InferConfig(
            block_size=args.block_size,
            max_seqs=1,
            max_len=args.prefix_len + args.suffix_len + 1,
            prefill_chunk=args.prefill_chunk,
            prefix_cache=enabled,
        )
        engine = Engine(model, infer=infer)
        first_token_seconds(engine, warm_up)
        before, prefilled = engine.prefix_cache_stats(), engine.stats["prompt_tokens"]
        seconds = first_token_seconds(engine, timed)
        after = engine.prefix_cache_stats()
        queried = after.queried_tokens - before.queried_tokens
        hits = after.hit_tokens - before.hit_tokens
        print(
            f"prefix_cache={'on ' if enabled else 'off'}  time to first token: median "
            f"{statistics.median(seconds) * 1e3:8.1f} ms  mean {statistics.mean(seconds) * 1e3:8.1f} ms  "
            f"prompt tokens prefilled {engine.stats['prompt_tokens'] - prefilled:,} of "
            f"{sum(map(len, timed)):,}  hit rate {hits / max(queried, 1):.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
