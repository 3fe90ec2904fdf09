"""`frontier-jax generate`: completions from an imported Hugging Face model or a training run.

    frontier-jax generate (--hf PATH | --checkpoint RUN_DIR[/checkpoints/STEP])
        (--prompt TEXT ... | --prompts FILE.jsonl) [--max-new-tokens N --temperature T
        --top-p P --top-k K --seed S --speculative mtp --out FILE.jsonl] [infer.key=value ...]
        [impl.key=value ...]

A prompts file holds one JSON object per line with "prompt" (text) or "prompt_ids"; --out
writes one JSON object per prompt with the Completion fields.  Without --out the texts are
printed.  A progress bar runs while generating; prompt and generated tokens/s at the end.
The model computes with dropless expert dispatch whatever the run trained with; an
impl.moe_dispatch=capacity override wins, with a warning (`runtime.program.inference_impl`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def add_generate_parser(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate text from --hf PATH or --checkpoint RUN_DIR",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hugging Face DeepseekV3 checkpoint directory")
    source.add_argument("--checkpoint", help="training run directory (latest step) or one checkpoints/STEP")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt text (repeat for several)")
    prompts.add_argument("--prompts", help='JSONL file: {"prompt": TEXT} or {"prompt_ids": [...]} per line')
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--speculative",
        choices=["none", "mtp"],
        default=None,
        help="mtp: draft with the model's MTP modules (default: infer.speculative)",
    )
    gen.add_argument(
        "--dtype",
        default=None,
        help="float32 or bfloat16 compute (default: float32 for --hf, "
        "the run's precision policy for --checkpoint)",
    )
    gen.add_argument("--out", help="write the completions as JSONL here")
    gen.add_argument(
        "overrides",
        nargs="*",
        help="infer.* and impl.* overrides, e.g. infer.max_seqs=16 impl.attention=cudnn",
    )
    gen.set_defaults(func=generate_command)


def _read_prompts(args) -> list:
    if args.prompt:
        return list(args.prompt)
    path = Path(args.prompts)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from err
        if not isinstance(record, dict) or ("prompt" in record) == ("prompt_ids" in record):
            raise ValueError(f'{path}:{number}: give exactly one of "prompt" (text) or "prompt_ids" (ints)')
        prompts.append(record.get("prompt", record.get("prompt_ids")))
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompt")
    return prompts


def _section_overrides(overrides: list[str], section: str) -> list[str]:
    return [o[len(section) + 1 :] for o in overrides if o.startswith(section + ".")]


def _impl_overrides(overrides: list[str]) -> dict:
    """impl.key=value overrides -> {key: value} (checked by `inference_impl` at load)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist(_section_overrides(overrides, "impl")))


def _infer_overrides(overrides: list[str]) -> dict:
    """infer.key=value overrides -> {key: typed value} (checked by InferConfig's types)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from frontier_jax.infer.config import InferConfig

    bad = [o for o in overrides if not o.startswith(("infer.", "impl.")) or "=" not in o]
    if bad:
        raise ValueError(
            f"override {bad[0]!r}: generate takes infer.key=value and impl.key=value overrides only "
            "(e.g. infer.max_seqs=16)"
        )
    overrides = _section_overrides(overrides, "infer")
    if not overrides:
        return {}
    try:
        given = OmegaConf.from_dotlist(overrides)
        infer = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(InferConfig), given)).validate()
    except OmegaConfBaseException as err:
        raise ValueError(
            f"invalid override: {str(err).splitlines()[0]} (fields: frontier_jax/infer/config.py)"
        ) from err
    return {k: getattr(infer, k) for k in OmegaConf.to_container(given)}


def generate_command(args) -> int:
    from frontier_jax.infer import Engine, SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    params.check()
    prompts = _read_prompts(args)
    infer = _infer_overrides(args.overrides)
    if args.speculative:
        infer["speculative"] = args.speculative
    impl = _impl_overrides(args.overrides)
    if args.hf:
        engine = Engine.from_hf(args.hf, dtype=args.dtype or "float32", infer=infer, impl=impl, verbose=True)
    else:
        engine = Engine.from_checkpoint(
            args.checkpoint, dtype=args.dtype, infer=infer, impl=impl, verbose=True
        )
    start = time.perf_counter()
    completions = engine.generate(prompts, params, progress=True)
    elapsed = time.perf_counter() - start
    s = engine.stats
    errors = [c.error for c in completions if c.error]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            for c in completions:
                f.write(json.dumps(dataclasses.asdict(c)) + "\n")
    else:
        for c in completions:
            if c.error is None:
                print(c.text if c.text is not None else " ".join(map(str, c.output_ids)))
                print("---")
    print(
        f"{len(completions)} prompts in {elapsed:.1f} s (compilation included): prompt {s['prompt_tokens'] / max(s['prefill_s'], 1e-9):,.0f} "
        f"tok/s, generated {s['generated_tokens']} tokens at {s['generated_tokens'] / max(s['decode_s'], 1e-9):,.0f} "
        "tok/s",
        file=sys.stderr,
    )
    spec = engine.speculative_stats
    if spec:
        print(
            f"MTP: acceptance {spec['acceptance_rate']:.1%}, {spec['tokens_per_forward']:.2f} tokens per forward",
            file=sys.stderr,
        )
    return 2 if len(errors) == len(completions) else 0
