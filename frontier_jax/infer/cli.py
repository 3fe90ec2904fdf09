"""`frontier-jax generate`: completions from an imported Hugging Face model or a training run.

    frontier-jax generate (--hf PATH | --checkpoint RUN_DIR[/checkpoints/STEP])
        (--prompt TEXT ... | --prompts FILE.jsonl) [--max-new-tokens N --temperature T
        --top-p P --top-k K --seed S --speculative mtp --out FILE.jsonl --expert-stats FILE.npz]
        [infer.key=value ...] [impl.key=value ...] [experts.window_steps=N]

A prompts file holds one JSON object per line with "prompt" (text) or "prompt_ids" (ints), and
no other key; --out writes one JSON object per prompt, {"index": k, <Completion fields>}, in
prompt order, each line flushed as soon as the prompts before it are done (`generate_io.py`).
Without --out the texts are printed.  --expert-stats writes the expert-load ledger's window (the
tokens each MoE layer routed to each expert over the last experts.window_steps engine steps)
as `[layers, experts]` with its token count, .npz or .json by the suffix
(`runtime/expert_ledger.py`; `frontier-jax experts plan --stats FILE` plans a placement from it).  A progress bar runs while generating; prompt and
generated tokens/s at the end.  The arguments, the prompts file and the --out path are checked
before the model loads.  The model computes with dropless expert dispatch whatever the run
trained with; an impl.moe_dispatch=capacity override wins, with a warning
(`runtime.program.inference_impl`).

Exit codes: 0 every request completed; 2 a bad argument or file (nothing generated), or every
request failed; 6 some requests failed (an `error:` line each, and their lines in --out with
"finish_reason": "error"), the others completed and were written.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from frontier_jax.infer.generate_io import CompletionsFile, check_output_path, read_prompts_file
from frontier_jax.runtime.expert_ledger import check_stats_path, save_expert_load

EXIT_USAGE = 2  # a bad argument or file, or every request failed
EXIT_SOME_FAILED = 6  # some requests failed, the others completed (and were written to --out)


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
    prompts.add_argument(
        "--prompts", help='JSONL file: {"prompt": TEXT} or {"prompt_ids": [INT, ...]} per line, no other key'
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed, in [0, 2^32)")
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
    gen.add_argument(
        "--out", help="write the completions as JSONL here, in prompt order as they finish (flushed)"
    )
    gen.add_argument(
        "--expert-stats",
        help="write the expert load per MoE layer (the ledger's window) here: FILE.npz or FILE.json",
    )
    gen.add_argument(
        "overrides",
        nargs="*",
        help="infer.*, impl.* and experts.* overrides, e.g. infer.max_seqs=16 impl.attention=cudnn",
    )
    gen.set_defaults(func=generate_command)


def _read_prompts(args) -> list:
    return list(args.prompt) if args.prompt else read_prompts_file(args.prompts)


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

    bad = [o for o in overrides if not o.startswith(("infer.", "impl.", "experts.")) or "=" not in o]
    if bad:
        raise ValueError(
            f"override {bad[0]!r}: generate takes infer.key=value, impl.key=value and "
            "experts.key=value overrides only (e.g. infer.max_seqs=16)"
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


def _experts_config(overrides: list[str]):
    """experts.key=value overrides -> the checked ExpertsConfig (`runtime/expert_ledger.py`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from frontier_jax.runtime.expert_ledger import ExpertsConfig

    try:
        given = OmegaConf.from_dotlist(_section_overrides(overrides, "experts"))
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExpertsConfig), given)).validate()
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid override: {str(err).splitlines()[0]} (fields: window_steps)") from err


def _check_dtype(dtype: str | None) -> None:
    from frontier_jax.convert.importer import DTYPE_POLICIES

    if dtype is not None and dtype not in DTYPE_POLICIES:
        raise ValueError(f"--dtype {dtype}: use one of {', '.join(DTYPE_POLICIES)}")


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
    _check_dtype(args.dtype)
    prompts = _read_prompts(args)
    infer = _infer_overrides(args.overrides)
    if args.speculative:
        infer["speculative"] = args.speculative
    if args.out:
        check_output_path(args.out)
    if args.expert_stats:
        check_stats_path(args.expert_stats)
    impl = _impl_overrides(args.overrides)
    experts = _experts_config(args.overrides)
    if args.hf:
        engine = Engine.from_hf(
            args.hf, dtype=args.dtype or "float32", infer=infer, impl=impl, experts=experts, verbose=True
        )
    else:
        engine = Engine.from_checkpoint(
            args.checkpoint, dtype=args.dtype, infer=infer, impl=impl, experts=experts, verbose=True
        )
    start = time.perf_counter()
    with open(args.out, "w") if args.out else contextlib.nullcontext() as out:
        on_finish = CompletionsFile(out).add if out else None
        completions = engine.generate(prompts, params, progress=True, on_finish=on_finish)
    elapsed = time.perf_counter() - start
    s = engine.stats
    errors = [c.error for c in completions if c.error]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not args.out:
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
    if args.expert_stats:
        steps = engine.expert_ledger.steps()
        save_expert_load(args.expert_stats, steps)
        print(f"expert load of {steps.window().tokens} tokens in {args.expert_stats}", file=sys.stderr)
    spec = engine.speculative_stats
    if spec:
        print(
            f"MTP: acceptance {spec['acceptance_rate']:.1%}, {spec['tokens_per_forward']:.2f} tokens per forward",
            file=sys.stderr,
        )
    if not errors:
        return 0
    return EXIT_USAGE if len(errors) == len(completions) else EXIT_SOME_FAILED
