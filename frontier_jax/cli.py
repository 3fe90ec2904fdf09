"""`frontier-jax` command line: train, describe, convert.

    frontier-jax train    --config configs/train/toy.yaml --run-dir DIR [key=value ...]
    frontier-jax describe --config configs/model/deepseek-v3-671b.yaml [--seq-len T] [--json]
    frontier-jax convert  {check,export} --hf PATH [...]
"""

from __future__ import annotations

import argparse
import json
import sys


def _describe(args) -> int:
    from frontier_jax.config import load_config
    from frontier_jax.model.describe import describe, format_description

    cfg = load_config(args.config, args.overrides)
    info = describe(cfg.model, seq_len=args.seq_len or cfg.train.seq_len)
    print(json.dumps(info) if args.json else format_description(info))
    return 0


def _train(args) -> int:
    from frontier_jax.train.loop import train_from_cli

    return train_from_cli(args.config, args.run_dir, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frontier-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (resumes from --run-dir if it has checkpoints)")
    train.add_argument("--config", required=True, help="YAML path or name under configs/, e.g. train/toy")
    train.add_argument("--run-dir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, plots")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    train.set_defaults(func=_train)

    desc = sub.add_parser("describe", help="parameter counts, KV-cache bytes and FLOPs of a config")
    desc.add_argument("--config", required=True)
    desc.add_argument("--seq-len", type=int, default=None, help="sequence length for the FLOPs figure")
    desc.add_argument("--json", action="store_true", help="print one JSON object")
    desc.add_argument("overrides", nargs="*")
    desc.set_defaults(func=_describe)

    sub.add_parser("convert", help="Hugging Face DeepseekV3 checkpoints in and out "
                   "(frontier-jax convert --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:  # its own parser (check / export sub-commands)
        from frontier_jax.convert.cli import main as convert_main

        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
