"""Log-probabilities of targets from the final-normed hidden state: full logits vs vocabulary chunks.

    python benchmarks/logprobs.py [--tokens 16384 --dim 2048 --vocab 129280 --chunk 8192] [--json FILE]

For g [N, d] (bf16), W [d, V] (bf16) and targets [N]: log p(y) = z_y - lse(z), z = g W (fp32
accumulation), computed
  full     the [N, V] fp32 logits, then log-softmax (what the scorer did before `runtime/logprobs`)
  chunked  `model.logprobs.chunked_target_logprobs`: strided chunks of <= --chunk columns
forward only (scoring) and forward + gradient w.r.t. g and W (post-training), each compiled on
its own; reports the median time of 10 runs and XLA's temporary bytes (`memory_analysis`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from frontier_jax.model.logprobs import chunked_target_logprobs, target_logprobs


def _full(g, w, y):
    return target_logprobs(jnp.einsum("nd,dv->nv", g, w, preferred_element_type=jnp.float32), y)[0]


def _chunked(chunk):
    return lambda g, w, y: chunked_target_logprobs(g, w, y, chunk=chunk)[0]


def _measure(fn, args) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    memory = compiled.memory_analysis()
    return {"ms": 1e3 * statistics.median(times), "temp_gib": memory.temp_size_in_bytes / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--json")
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 3)
    g = jax.random.normal(keys[0], (args.tokens, args.dim), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (args.dim, args.vocab)) / args.dim**0.5).astype(jnp.bfloat16)
    y = jax.random.randint(keys[2], (args.tokens,), 0, args.vocab)
    results = {"device": jax.devices()[0].device_kind, **vars(args)}
    full = jax.jit(_full)(g, w, y)
    chunked = jax.jit(_chunked(args.chunk))(g, w, y)
    results["max_abs_diff"] = float(jnp.abs(full - chunked).max())
    for name, fn in (("full", _full), ("chunked", _chunked(args.chunk))):
        results[f"{name}_forward"] = _measure(fn, (g, w, y))
        grad = jax.grad(lambda g, w, y, fn=fn: fn(g, w, y).sum(), argnums=(0, 1))
        results[f"{name}_forward_backward"] = _measure(grad, (g, w, y))
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
