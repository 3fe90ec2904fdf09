"""Inference figures of the engine: prefill and decode throughput, latent-cache traffic, MTP.

    python benchmarks/decode.py --config model/toy --batches 1,8 --prompt-len 64 --new-tokens 32   # CPU
    python benchmarks/decode.py --config model/bench-1b --dtype bfloat16 --batches 1,32,256 \\
        --prompt-len 1024 --new-tokens 256                                                       # GPU
    python benchmarks/decode.py --checkpoint runs/toy --batches 4 --speculative                  # MTP
    python benchmarks/decode.py --config model/bench-1b --dtype bfloat16 --batches 1,32 \\
        --prompt-len 4000 --new-tokens 64 --hf-peer --profile DIR                                # GPU
    python benchmarks/decode.py --config model/bench-1b --dtype bfloat16 --batches 1,32,256 \\
        --prompt-len 4000 --new-tokens 32 --decode-attention pallas --async-decode off,on        # GPU
    python benchmarks/decode.py --config model/bench-1b --dtype bfloat16 --batches 1,32,256 \
        --prompt-len 4000 --new-tokens 64 --decode-steps-per-dispatch 1,4,8                      # GPU

For each batch size B: B random prompts of --prompt-len tokens, --new-tokens greedy tokens
each (the model: random weights from --config, or a training run's --checkpoint).  One
untimed run compiles every program; the timed run reports
  prefill tok/s   prompt tokens / prefill time (chunked, expanded MLA)
  decode tok/s    generated tokens / decode time (absorbed MLA, sampling and host work included)
  cache read      latent bytes a decode step needs: sum over rows of cached tokens x
                  (L + D)(d_c + d_h^R) x itemsize (mean per step)
  weights read    parameter bytes in the compute dtype (an upper bound: all experts)
  bandwidth       (cache read + weights read) / decode step time
--decode-attention, --async-decode and --decode-steps-per-dispatch take lists: every combination
runs in turn, in one process (infer.async_decode off: each step's tokens are read back before the
next step is dispatched; infer.decode_steps_per_dispatch = k > 1: k decode steps per dispatch,
read back synchronously; ms/step is per decode step, a dispatch counting k).
With --speculative (a model with MTP modules): each batch runs without and then with MTP drafts in
one process (after the plain runs, one step per dispatch); acceptance rate, tokens per main forward
and the decode speed-up of drafting over the fastest plain run of the batch.
With --text-prompts: prompts are windows of the embedded standard-library code in the model's
tokenizer (what a model trained by the README's main command has seen the like of) instead of
random tokens.
With --host-profile: the host functions that take the most time in the timed run (cProfile).
With --profile DIR: a few more decode steps, then one more prefill of the prompts, under
`jax.profiler.trace(DIR)`; device time per decode step and per prefill chunk by kernel family and
the top device ops, next to the wall time (the rest is host work and launch gaps).  With --hf-peer: transformers `generate` (greedy, its default
cache) on the same architecture with random weights, same batch / prompt / new tokens, run
before JAX touches the GPU:
  prefill tok/s   B x prompt / time of generate(max_new_tokens=1)
  decode tok/s    B x (N - 1) / (time of generate(N) - time of generate(1))
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frontier_jax.config import load_config
from frontier_jax.data.embedded import stdlib_code_files
from frontier_jax.infer import Engine, InferConfig, SamplingParams
from frontier_jax.infer.cache import cache_bytes_per_token
from frontier_jax.model import build_model
from frontier_jax.model.config import AttentionImpl, ImplConfig
from frontier_jax.precision import get_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_peer import hf_peer_model  # noqa: E402
from profile_step import by_category, summarise  # noqa: E402

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU (--hf-peer)


def build_engine(args, infer: InferConfig) -> Engine:
    if args.checkpoint:
        return Engine.from_checkpoint(args.checkpoint, dtype=args.dtype, infer=infer)
    cfg = load_config(args.config).model
    policy = get_policy({"float32": "fp32", "bfloat16": "bf16"}[args.dtype])
    impl = ImplConfig(attention=AttentionImpl(args.attention))
    model = build_model(cfg, impl=impl, policy=policy, rngs=nnx.Rngs(0))
    # stored in the compute dtype, as `Engine.from_checkpoint(dtype=...)` restores them (the
    # expert biases, not parameters, stay float32): fp32 master weights would be converted
    # on every step
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(policy.compute_dtype), params))
    return Engine(model, infer=infer)


def text_prompts(engine: Engine, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens of the embedded standard-library code, one per file
    (files too short are skipped), in the engine's tokenizer."""
    if engine.tokenizer is None:
        raise SystemExit("error: --text-prompts needs a model with a tokenizer (--checkpoint RUN_DIR)")
    prompts = []
    for path in stdlib_code_files():
        ids = engine.tokenizer.encode(Path(path).read_text(encoding="utf-8"))
        if len(ids) >= 2 * length:
            prompts.append(ids[length : 2 * length])  # past the license header
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"error: only {len(prompts)} stdlib files have {2 * length} tokens; lower --prompt-len")


def run(engine: Engine, prompts, params) -> tuple[dict, float]:
    for key in engine.stats:
        engine.stats[key] = 0
    start = time.perf_counter()
    engine.generate(prompts, params)
    return dict(engine.stats), time.perf_counter() - start


def profile_decode(engine: Engine, prompts, steps: int, out: Path, wall_step_s: float) -> None:
    """Device time per decode step under the profiler (module docstring): the prompts are
    prefilled and decoded for two dispatches outside the trace, then `steps` dispatches of k =
    infer.decode_steps_per_dispatch decode steps each traced."""
    k = engine.infer.decode_steps_per_dispatch
    params = SamplingParams(max_new_tokens=(steps + 4) * k, ignore_eos=True)
    for prompt in prompts:
        engine.submit(prompt, params)
    start = engine.stats["decode_steps"]
    while engine.stats["decode_steps"] < start + 2 * k:  # every row past its prefill
        engine.step()
    out.mkdir(parents=True, exist_ok=True)
    jax.block_until_ready(engine.cache)  # the trace holds the device work of exactly `steps` dispatches
    with jax.profiler.trace(str(out)):
        for _ in range(steps):
            engine.step()
        jax.block_until_ready(engine.cache)
    while not engine.scheduler.idle:
        engine.step()
    print_profile(summarise(out, steps * k, 10**6), "decode step", wall_step_s)


def profile_prefill(engine: Engine, prompts, out: Path, wall_prefill_s: float) -> None:
    """Device time per prefill chunk under the profiler: the engine steps from submission until no
    row is prefilling, one chunk each (the last one also dispatches the first decode step, a few
    percent of a chunk's device time at 4K prompts, counted in)."""
    for prompt in prompts:
        engine.submit(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
    out.mkdir(parents=True, exist_ok=True)
    jax.block_until_ready(engine.cache)
    chunks = 0
    with jax.profiler.trace(str(out)):
        while engine.scheduler.waiting or any(r.prefilling for r in engine.scheduler.running):
            engine.step()
            chunks += 1
        jax.block_until_ready(engine.cache)
    while not engine.scheduler.idle:
        engine.step()
    print_profile(summarise(out, chunks, 10**6), f"prefill chunk ({chunks} chunks)", wall_prefill_s / chunks)


def print_profile(every: list[tuple[str, float, int]], what: str, wall_s: float) -> None:
    """Device ms per `what` by kernel family and the top ops (`profile_step.summarise` rows)."""
    total = sum(ms for _, ms, _ in every)
    print(f"        profile: {total:.3f} ms device time per {what} against {wall_s * 1e3:.2f} ms wall")
    for category, ms in by_category(every).items():
        print(f"          {category:40s} {ms:8.3f} ms {ms / total:6.1%}")
    for name, ms, count in every[:12]:
        print(f"          {name[:60]:60s} {ms:8.3f} ms {ms / total:6.1%} {count:5d} calls")


def hf_generate(cfg, batch: int, prompt_len: int, new_tokens: int, dtype: str) -> str:
    """transformers `generate` on the same architecture, random weights (module docstring)."""
    import torch

    model, device = hf_peer_model(cfg, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    model.eval()
    ids = torch.randint(0, min(cfg.vocab_size, 256), (batch, prompt_len), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        sync()
        return time.perf_counter() - start

    timed(2)  # warm-up
    first, full = timed(1), timed(new_tokens)
    model = None  # the closure holds the cell: drop the weights before JAX runs
    if device == "cuda":
        torch.cuda.empty_cache()
    decode_s = (full - first) / max(new_tokens - 1, 1)
    return (
        f"B={batch:4d}  transformers generate: prefill {batch * prompt_len / first:10,.0f} tok/s  "
        f"decode {batch / decode_s:9,.0f} tok/s  ({decode_s * 1e3:.2f} ms/step)"
    )


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
    parser.add_argument("--speculative", action="store_true", help="also decode with MTP drafts")
    parser.add_argument("--text-prompts", action="store_true", help="prompts from the embedded code")
    parser.add_argument("--attention", default="xla", choices=[a.value for a in AttentionImpl])
    parser.add_argument(
        "--decode-attention",
        default="xla",
        help="comma-separated infer.decode_attention_impl values, each run in turn (e.g. xla,pallas)",
    )
    parser.add_argument(
        "--async-decode",
        default="on",
        help="comma-separated infer.async_decode values (on, off), each run in turn (e.g. off,on)",
    )
    parser.add_argument(
        "--decode-steps-per-dispatch",
        default="1",
        help="comma-separated infer.decode_steps_per_dispatch values, each run in turn (e.g. 1,4,8)",
    )
    parser.add_argument("--profile", type=Path, help="trace a few decode steps into this directory")
    parser.add_argument("--hf-peer", action="store_true", help="also time transformers generate")
    parser.add_argument(
        "--host-profile",
        action="store_true",
        help="cProfile the timed run: the host functions that take the most",
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    modes = {"on": True, "off": False}
    bad = [m for m in args.async_decode.split(",") if m not in modes]
    if bad:
        parser.error(f"--async-decode {bad[0]!r}: give on, off or both (e.g. off,on)")
    try:
        steps_per_dispatch = [int(k) for k in args.decode_steps_per_dispatch.split(",")]
    except ValueError:
        parser.error(
            f"--decode-steps-per-dispatch {args.decode_steps_per_dispatch!r}: give integers >= 1 (e.g. 1,4,8)"
        )
    if args.hf_peer:  # before JAX allocates on the GPU
        model_cfg = load_config(args.config).model
        for batch in batches:
            print(hf_generate(model_cfg, batch, args.prompt_len, args.new_tokens, args.dtype), flush=True)
    drafting = [(k, "none") for k in steps_per_dispatch] + ([(1, "mtp")] if args.speculative else [])
    plain_tok_s = {}
    runs = [
        (b, i, m, k, d)
        for b in batches
        for i in args.decode_attention.split(",")
        for m in args.async_decode.split(",")
        for k, d in drafting
    ]
    for batch, impl, mode, per_dispatch, speculative in runs:
        infer = InferConfig(
            max_seqs=batch,
            max_len=args.prompt_len + args.new_tokens + 1,
            prefill_chunk=args.prefill_chunk,
            decode_attention_impl=impl,
            speculative=speculative,
            async_decode=modes[mode],  # MTP drafting decodes synchronously either way
            prefix_cache=False,  # the timed run repeats the warm-up's prompts: time their prefill
            decode_steps_per_dispatch=per_dispatch,
        )
        engine = build_engine(args, infer)
        cfg = engine.cfg
        rng = np.random.default_rng(0)
        if args.text_prompts:
            prompts = text_prompts(engine, batch, args.prompt_len)
        else:
            prompts = [
                rng.integers(0, min(cfg.vocab_size, 256), args.prompt_len).tolist() for _ in range(batch)
            ]
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        run(engine, prompts, params)  # compiles
        profiler = cProfile.Profile() if args.host_profile else None
        if profiler:
            profiler.enable()
        stats, wall = run(engine, prompts, params)
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        dtype = jnp.dtype(args.dtype)
        per_token = cache_bytes_per_token(cfg, dtype)
        steps = max(stats["decode_steps"], 1)
        cache_read = stats["decode_context"] * per_token / steps
        weights = sum(math.prod(x.shape) for x in jax.tree.leaves(engine.state)) * dtype.itemsize
        step_s = stats["decode_s"] / steps
        decode_tok_s = stats["generated_tokens"] / max(stats["decode_s"], 1e-9)
        print(
            f"B={batch:4d} {impl:6s} {'async' if modes[mode] else 'sync':5s} k={per_dispatch}{' mtp' if speculative == 'mtp' else ''}  prefill {stats['prompt_tokens'] / max(stats['prefill_s'], 1e-9):10,.0f} tok/s  "
            f"decode {decode_tok_s:9,.0f} tok/s  "
            f"({step_s * 1e3:.2f} ms/step)  cache read {cache_read / 2**20:8.3f} MiB/step  "
            f"weights {weights / 2**20:8.1f} MiB  bandwidth {(cache_read + weights) / step_s / 1e9:7.2f} GB/s  "
            f"(wall {wall:.1f} s)",
            flush=True,
        )
        if args.profile:
            name = f"b{batch}_{impl}_{mode}_k{per_dispatch}_{speculative}"
            profile_decode(engine, prompts, 8, args.profile / name, step_s)
            profile_prefill(engine, prompts, args.profile / f"{name}_prefill", stats["prefill_s"])
        if speculative == "none":
            plain_tok_s[batch, impl, mode] = max(decode_tok_s, plain_tok_s.get((batch, impl, mode), 0.0))
        else:
            s = engine.speculative_stats
            print(
                f"        MTP: acceptance {s['acceptance_rate']:.1%}, {s['tokens_per_forward']:.2f} tokens per "
                f"forward ({s['accepted']}/{s['drafted']} drafts kept), decode "
                f"{decode_tok_s / plain_tok_s[batch, impl, mode]:.2f}x the fastest plain run"
            )


if __name__ == "__main__":
    main()
