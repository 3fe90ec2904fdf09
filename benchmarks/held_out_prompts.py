"""Prompts from the held-out text of the embedded data, to record expert loads while a model
generates over text its run did not train on.

    python benchmarks/held_out_prompts.py --checkpoint runs/toy --out held_out_prompts.jsonl [--chars 512]

Every document of the default eval.data (the arithmetic problems of eval.seed and the code
excerpts that the run's first pass reads last, `frontier_jax.eval.datasets`) cut to its first
--chars characters: one {"prompt": text} per line, for `frontier-jax generate --prompts`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from frontier_jax.config import load_config
from frontier_jax.data import load_tokenizer
from frontier_jax.eval.config import EvalConfig
from frontier_jax.eval.datasets import TrainingRun, read_documents


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a training run directory (its config.yaml)")
    parser.add_argument("--out", required=True, help="prompts JSONL")
    parser.add_argument("--chars", type=int, default=512, help="characters of each document kept")
    args = parser.parse_args()
    cfg = load_config(str(Path(args.checkpoint) / "config.yaml"))
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.special_tokens)
    run = TrainingRun.of(cfg.to_dict(), cfg.train.steps)  # an upper bound on what it read
    eval_cfg = EvalConfig()
    lines = []
    for source in eval_cfg.data:
        for text in read_documents(source, eval_cfg, tokenizer, run).documents:
            lines.append(json.dumps({"prompt": text[: args.chars]}))
    Path(args.out).write_text("".join(line + "\n" for line in lines))
    print(f"{len(lines)} prompts in {args.out}")


if __name__ == "__main__":
    main()
