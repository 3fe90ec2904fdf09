"""`frontier-jax convert` subcommands.

convert check  --hf PATH [--dtype float32|bfloat16] [--tokens N]
    import the checkpoint, print its config and parameter count, run a forward pass on N
    tokens and print the logits' shape and range (a smoke test of a download).
convert export --hf PATH --out DIR [--dtype float32|bfloat16] [--max-shard-mb M]
    import, then export again into DIR (round trips, or re-sharding / re-typing).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frontier_jax.convert.exporter import EXPORT_DTYPES, to_hf
from frontier_jax.convert.importer import DTYPE_POLICIES, from_hf


def _check(args) -> int:
    if args.tokens <= 0:
        raise ValueError(f"convert check --tokens {args.tokens}: must be > 0")
    cfg, model = from_hf(args.hf, dtype=args.dtype)
    n_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for field in dataclasses.fields(cfg):
        print(f"{field.name:>24}: {getattr(cfg, field.name)}")
    print(f"{'parameters':>24}: {n_params:,}")
    ids = jnp.arange(args.tokens, dtype=jnp.int32)[None] % cfg.vocab_size
    logits = jax.device_get(model(ids))
    finite = bool(np.isfinite(logits).all())
    print(
        f"forward on {args.tokens} tokens: logits {logits.shape}, "
        f"range [{logits.min():.4g}, {logits.max():.4g}], finite={finite}"
    )
    return 0 if finite else 1


def _export(args) -> int:
    _, model = from_hf(args.hf)
    to_hf(model, args.out, max_shard_bytes=int(args.max_shard_mb * 2**20), dtype=args.dtype)
    print(f"exported {args.hf} -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frontier-jax convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="import a HF checkpoint and run a forward pass")
    check.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    check.add_argument("--dtype", choices=list(DTYPE_POLICIES), default="float32", help="compute precision")
    check.add_argument("--tokens", type=int, default=8, help="tokens in the test forward pass")
    check.set_defaults(func=_check)
    export = sub.add_parser("export", help="import a HF checkpoint and export it again")
    export.add_argument("--hf", required=True, help="HF checkpoint directory to import")
    export.add_argument("--out", required=True, help="new directory for the exported checkpoint")
    export.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="float32", help="stored dtype")
    export.add_argument("--max-shard-mb", type=float, default=5 * 1024, help="largest shard, MiB")
    export.set_defaults(func=_export)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
