"""`frontier-jax` command line: train, describe, convert.

frontier-jax train    --config configs/train/toy.yaml --run-dir DIR [key=value ...]
frontier-jax describe --config configs/model/deepseek-v3-671b.yaml [--seq-len T] [--json]
                      [--mesh mesh/gpu-8] [--devices N] [--device-memory-gib G] [key=value ...]
frontier-jax convert  {check,export} --hf PATH [...]
frontier-jax generate (--hf PATH | --checkpoint RUN_DIR) (--prompt TEXT ... | --prompts FILE) [...]
frontier-jax serve    (--checkpoint RUN_DIR[/checkpoints/STEP] | --hf PATH) [--host H] [--port P] [...]
frontier-jax eval     (--checkpoint RUN_DIR[/checkpoints/STEP] | --hf PATH) [--data FILE ...]
                      [--tasks TASK ...] [--out DIR] [--step N] [--dtype bfloat16] [mesh.* / eval.* / impl.* ...]
frontier-jax ablate   --config ablations/NAME.yaml [--out DIR]
frontier-jax data prepare --config train/toy --out DIR [--records-per-shard N] [--max-records N]
                      [--workers N] [key=value ...]
frontier-jax checkpoint verify RUN_DIR
frontier-jax rewards score --rewards math,format:0.2 --in completions.jsonl --out scored.jsonl
frontier-jax rejection-sample --checkpoint RUN --prompts FILE --n 8 --rewards math --out sft.jsonl [...]
frontier-jax grpo     --config posttrain/grpo-toy --run-dir DIR [train.init_from=RUN] [key=value ...]
frontier-jax experts  plan --stats FILE --replicas R --devices D [--groups G --nodes N] [--out PLAN.json]
frontier-jax experts  plot --stats FILE --out PNG
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# Exit codes (README "When things go wrong"); 75 (EX_TEMPFAIL): stopped by a signal after
# saving, run again to resume (frontier_jax/train/signals.py).
EXIT_USAGE = 2  # a bad config, argument, path or file
EXIT_NONFINITE = 3  # the loss or gradients are not finite
EXIT_DATA = 4  # the data stopped feeding training
EXIT_CHECKPOINT = 5  # a checkpoint could not be written, is corrupt, or none restores
# 6: generate wrote every completion but some requests failed (frontier_jax/infer/cli.py)
EXIT_LOCKED = 7  # another trainer holds the run directory (frontier_jax/train/run_lock.py)
# 8: serve --distributed lost a process: a follower (or process 0) failed (frontier_jax/serve/replicate.py)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) outside training's own handling: 128 + 2

_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")  # a dotted key=value override, e.g. eval.stride=64


class _ValuesAndOverrides(argparse.Action):
    """A nargs="*" option (eval --data / --tasks) that would swallow the key=value overrides after
    it: the dotted key=value values join `overrides` (in command-line order; the positional
    `overrides` takes this action too), the others are the option's values."""

    def __call__(self, parser, namespace, values, option_string=None):
        is_override = [self.dest == "overrides" or bool(_OVERRIDE.match(v)) for v in values]
        namespace.overrides = [*(namespace.overrides or []), *(v for v, o in zip(values, is_override) if o)]
        if self.dest != "overrides":
            mine = [v for v, o in zip(values, is_override) if not o]
            setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *mine])


def _mesh_overrides(preset: str) -> list[str]:
    """The whole mesh section of a preset file (e.g. mesh/gpu-8) as dotted overrides, so that
    it replaces the --config's mesh and later key=value overrides still win."""
    from omegaconf import OmegaConf

    from frontier_jax.config import load_config

    def flatten(tree: dict, prefix: str) -> list[str]:
        out = []
        for key, value in tree.items():
            out += (
                flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"]
            )
        return out

    return flatten(OmegaConf.to_container(OmegaConf.structured(load_config(preset).mesh)), "mesh.")


def _describe(args) -> int:
    from frontier_jax.config import load_config
    from frontier_jax.model.describe import describe, format_description
    from frontier_jax.runtime.program import model_program

    for flag, value in (
        ("--seq-len", args.seq_len),
        ("--devices", args.devices),
        ("--device-memory-gib", args.device_memory_gib),
    ):
        if value is not None and value <= 0:
            raise ValueError(f"describe {flag} {value}: must be > 0")
    overrides = (_mesh_overrides(args.mesh) if args.mesh else []) + list(args.overrides)
    cfg = load_config(args.config, overrides)
    program = model_program(cfg)  # shapes only, no mesh
    info = describe(cfg.model, seq_len=args.seq_len or cfg.train.seq_len, params=program.abstract_params)
    text = format_description(info)
    if args.mesh or args.devices or args.device_memory_gib is not None or args.grpo:
        from frontier_jax.runtime.memory import device_memory, fits, format_memory, verdict

        mem = device_memory(program, cfg.train, args.devices)
        gib, extra = args.device_memory_gib, 0
        text += "\n" + format_memory(mem, program, cfg.train, None if args.grpo else gib)
        if args.grpo:
            from frontier_jax.posttrain.memory import format_grpo_memory, grpo_memory

            grpo = grpo_memory(program, cfg, mem)
            extra = grpo.total
            info["grpo_per_device_bytes"] = {
                "reference": grpo.reference,
                "latent_cache": grpo.latent_cache,
                "reward_models": grpo.reward_models,
                "total_with_trainer": mem.total + extra,
            }
            text += "\n" + format_grpo_memory(grpo, mem)
            if gib is not None:
                text += "\n  " + verdict(mem, gib, extra)
        info.update(
            mesh=mem.mesh,
            batch_per_device=mem.batch_per_device,
            per_device_bytes=mem.per_device_bytes(),
            device_memory_gib=gib,
            fits=None if gib is None else fits(mem, gib, extra),
        )
        if info["fits"] is False and args.json:  # stdout stays one JSON object
            print(verdict(mem, gib, extra), file=sys.stderr)
    from frontier_jax.parallel.pipeline.plan import describe_plan, format_plan, pipeline_plan

    plan = pipeline_plan(cfg.train, cfg.mesh, cfg.model)
    if plan is not None:
        info["pipeline"] = describe_plan(plan)
        text += "\n" + format_plan(info["pipeline"])
    print(json.dumps(info) if args.json else text)
    return 0


def _train(args) -> int:
    from frontier_jax.train.signals import raise_on_stop_signals

    with raise_on_stop_signals():  # a signal while starting: `preempted:` and 75, as later ones
        if args.distributed:
            from frontier_jax.parallel.host import initialize_distributed

            initialize_distributed()
        from frontier_jax.config import load_config
        from frontier_jax.train.loop import train

        _configure_logging(args.verbose)
        cfg = load_config(args.config, args.overrides)
        evaluate = None
        if cfg.eval.every:
            from frontier_jax.data import load_tokenizer
            from frontier_jax.eval.run import training_evaluator

            evaluate = training_evaluator(cfg, load_tokenizer(cfg.data.tokenizer, cfg.data.special_tokens))
        history = train(cfg, args.run_dir, restart_data=args.restart_data, evaluate=evaluate)
    if history:
        first, last = history[0], history[-1]
        print(
            f"done: step {last['step']}, loss {first['loss']:.4f} (step {first['step']}) -> "
            f"{last['loss']:.4f}; metrics in {Path(args.run_dir) / 'metrics.jsonl'}, "
            f"curve in {Path(args.run_dir) / 'loss.png'}"
        )
    return 0


def _grpo(args) -> int:
    from frontier_jax.train.signals import raise_on_stop_signals

    with raise_on_stop_signals():  # a signal while starting: `preempted:` and 75, as in training
        from frontier_jax.config import load_config
        from frontier_jax.posttrain.grpo_cli import run_grpo

        _configure_logging(args.verbose)
        cfg = load_config(args.config, args.overrides)
        history = run_grpo(cfg, args.run_dir)
    if history:
        first, last = history[0], history[-1]
        reward = lambda r: r.get("grpo/reward_mean", float("nan"))  # noqa: E731
        print(
            f"done: step {last['step']}, mean reward {reward(first):.4f} (step {first['step']}) -> "
            f"{reward(last):.4f}; metrics in {Path(args.run_dir) / 'metrics.jsonl'}, "
            f"curves in {Path(args.run_dir) / 'grpo.png'}"
        )
    return 0


def _eval(args) -> int:
    if args.distributed:
        from frontier_jax.parallel.host import initialize_distributed

        initialize_distributed()
    from frontier_jax.config import load_config
    from frontier_jax.eval.datasets import source_from_path
    from frontier_jax.eval.model import load_checkpoint, load_hf
    from frontier_jax.eval.run import evaluate, format_table, format_tasks, write_results
    from frontier_jax.eval.tasks import resolve_task

    _configure_logging(False)
    if (args.checkpoint is None) == (args.hf is None):
        raise ValueError("eval: give exactly one of --checkpoint RUN_DIR and --hf PATH")
    bad = [
        o for o in args.overrides if not o.startswith(("mesh.", "eval.", "impl.", "model.", "data.tokenizer"))
    ]
    if bad:
        raise ValueError(
            f"eval override {bad[0]!r}: only mesh.*, eval.*, impl.* (and model.* to check the checkpoint) "
            "apply to evaluation"
        )
    cfg = load_config(None, args.overrides)

    def given(section: str) -> dict:  # the section's keys set on the command line, typed
        keys = [o.split("=", 1)[0][len(section) + 1 :] for o in args.overrides if o.startswith(section + ".")]
        return {key: getattr(getattr(cfg, section), key) for key in keys}

    model_overrides, impl = given("model"), given("impl")
    tasks = [
        resolve_task(t, cfg.eval) for t in args.tasks
    ]  # bad task names / files fail before the model loads
    if args.checkpoint is not None:
        model = load_checkpoint(
            args.checkpoint,
            args.step,
            mesh=cfg.mesh,
            dtype=args.dtype,
            model_overrides=model_overrides,
            devices=args.devices,
            impl=impl,
        )
    else:
        tokenizer = next(
            (o.split("=", 1)[1] for o in args.overrides if o.startswith("data.tokenizer=")), None
        )
        model = load_hf(
            args.hf, mesh=cfg.mesh, dtype=args.dtype, tokenizer=tokenizer, devices=args.devices, impl=impl
        )
    if args.preferences:
        from frontier_jax.eval.preferences import evaluate_preferences

        figures = evaluate_preferences(model, args.preferences, cfg.eval.batch_size)
        path = write_results(args.out, {"source": model.source, "step": model.step, "preferences": figures})
        print(
            f"preferences {args.preferences}: {figures['pairs']} pairs, accuracy {figures['accuracy']:.4f}, "
            f"mean margin {figures['mean_margin']:.4f}; results in {path}"
        )
        return 0
    sources = [source_from_path(p) for p in args.data] if args.data else cfg.eval.data
    results = evaluate(model, cfg.eval, sources, tasks=tasks)
    path = write_results(args.out, results)
    print(format_table(results["datasets"]))
    if tasks:
        print(format_tasks(results["tasks"]))
    print(
        f"step {results['step']}, window {results['window']}, stride {results['stride']}; results in {path}"
    )
    return 0


def _ablate(args) -> int:
    from frontier_jax.config import load_config
    from frontier_jax.eval.ablate import run_ablation

    _configure_logging(False)
    out = args.out or str(Path("runs") / "ablations" / Path(args.config).stem)
    result = run_ablation(args.config, out, load_config=load_config)
    print(result["table"])
    print(
        f"results in {Path(out) / 'results.json'}, {Path(out) / 'results.md'}, curves in {Path(out) / 'curves.png'}"
    )
    return 0


def _data_prepare(args) -> int:
    from frontier_jax.config import load_config
    from frontier_jax.data.prepare import prepare, prepared_sources

    cfg = load_config(args.config, args.overrides)
    options = {"records_per_shard": args.records_per_shard, "workers": args.workers}
    results = prepare(
        cfg.data,
        args.out,
        max_records=args.max_records,
        **{k: v for k, v in options.items() if v is not None},  # else prepare's defaults
    )
    for result in results:
        shards = result.manifest["shards"]
        print(
            f"{result.directory}: {len(shards)} shards ({len(result.written)} written, "
            f"{len(shards) - len(result.written)} kept), {sum(s['documents'] for s in shards):,} documents, "
            f"{sum(s['tokens'] for s in shards):,} tokens, {sum(s['bytes'] for s in shards) / 2**20:.1f} MiB"
        )
    cfg.data.sources = prepared_sources(cfg.data, args.out)
    config_path = Path(args.out) / "config.yaml"
    config_path.write_text(cfg.to_yaml())
    print(f"train on the shards: frontier-jax train --config {config_path} --run-dir RUN_DIR")
    return 0


def _data_arithmetic(args) -> int:
    from frontier_jax.data.chat_math import Difficulty, held_out_problems, train_problems, write_problems

    level = Difficulty(args.min_operations, args.max_operations, args.max_operand, args.max_factor).validate()
    if args.count < 1:
        raise ValueError(f"--count {args.count} must be >= 1")
    if args.split == "held_out":
        problems = held_out_problems(level, args.count, **({} if args.seed is None else {"seed": args.seed}))
    else:
        problems = train_problems(level, args.count, 0 if args.seed is None else args.seed)
    path = write_problems(args.out, problems)
    print(f"{path}: {len(problems)} {args.split} problems ({level}), rows {{prompt, answer}}")
    return 0


def _checkpoint_verify(args) -> int:
    from frontier_jax.runtime.integrity import CORRUPT, OK, UNVERIFIED, verify_run, verify_step
    from frontier_jax.runtime.restore import checkpoint_directory

    directory, step = checkpoint_directory(args.run_dir)
    verdicts = verify_run(directory) if step is None else {step: verify_step(directory, step)}
    for checked, verdict in verdicts.items():
        print(f"step {checked}: {verdict.describe()}")
    counts = {s: sum(v.status == s for v in verdicts.values()) for s in (OK, CORRUPT, UNVERIFIED)}
    print(
        f"{len(verdicts)} step{'s' * (len(verdicts) != 1)} in {directory}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
    )
    return EXIT_CHECKPOINT if counts[CORRUPT] else 0


def _log_unraisable(unraisable) -> None:
    import logging

    logging.getLogger(__name__).debug(
        "ignored %s in %r: %s", unraisable.exc_type.__name__, unraisable.object, unraisable.exc_value
    )


def _configure_logging(verbose: bool) -> None:
    """The project's INFO messages and every library's warnings; library INFO (orbax, through
    absl: ~100 lines per run), orbax's error tracebacks, asyncio's errors of orbax's tasks and the
    exceptions Python ignores in libraries' background threads and coroutines
    (sys.unraisablehook: asyncio callbacks of a failed save or restore) only with --verbose (a
    failure is reported as one `error:` line)."""
    import logging
    import warnings

    sys.unraisablehook = sys.__unraisablehook__ if verbose else _log_unraisable

    # force: libraries imported earlier (absl via orbax) may already have configured logging
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("frontier_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.INFO if verbose else logging.CRITICAL)
    # orbax's asyncio tasks of a failed save or restore ("Task exception was never retrieved", and
    # at exit "coroutine ... was never awaited")
    logging.getLogger("asyncio").setLevel(logging.INFO if verbose else logging.CRITICAL)
    if not verbose:
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    # one warning per scalar of a non-finite step; the loop's own warning says it once
    logging.getLogger("tensorboardX").setLevel(logging.INFO if verbose else logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frontier-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (resumes from --run-dir if it has checkpoints)")
    train.add_argument("--config", required=True, help="YAML path or name under configs/, e.g. train/toy")
    train.add_argument("--run-dir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, plots")
    train.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process run: call jax.distributed.initialize() first (see launch/)",
    )
    train.add_argument(
        "--restart-data",
        action="store_true",
        help="resume the trained state but read the data stream from its start (after changing "
        "data.* / seq_len / global_batch, which the saved data position belongs to)",
    )
    train.add_argument(
        "--verbose", action="store_true", help="also print the libraries' INFO logs (orbax ...)"
    )
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    train.set_defaults(func=_train)

    desc = sub.add_parser(
        "describe", help="parameter counts, KV-cache bytes, FLOPs and per-device memory of a config"
    )
    desc.add_argument("--config", required=True)
    desc.add_argument("--seq-len", type=int, default=None, help="sequence length for the FLOPs figure")
    desc.add_argument("--json", action="store_true", help="print one JSON object")
    desc.add_argument(
        "--mesh",
        default=None,
        help="mesh preset replacing the config's mesh section, "
        "e.g. mesh/gpu-8; prints per-device memory (batch and seq from train.*) and, with "
        "mesh.stage > 1 and train.pipeline.schedule, the layers per stage and the simulated bubble",
    )
    desc.add_argument(
        "--devices",
        type=int,
        default=None,
        help="device count (default: the product of the mesh sizes; needed with mesh.data=-1)",
    )
    desc.add_argument(
        "--device-memory-gib",
        type=float,
        default=None,
        help="memory of one device; prints whether the run fits",
    )
    desc.add_argument(
        "--grpo",
        action="store_true",
        help="also the memory a `frontier-jax grpo` run holds beside the trainer's in one process: "
        "the reference (grpo.beta > 0), the rollout engine's latent cache, reward models",
    )
    desc.add_argument("overrides", nargs="*")
    desc.set_defaults(func=_describe)

    ev = sub.add_parser(
        "eval", help="perplexity / CE / bits per byte of a checkpoint or HF model on held-out data"
    )
    ev.add_argument("--checkpoint", default=None, help="a training run directory (or its checkpoints/<step>)")
    ev.add_argument("--hf", default=None, help="a Hugging Face DeepseekV3 directory")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ev.add_argument(
        "--data",
        nargs="*",
        default=[],
        action=_ValuesAndOverrides,
        help="JSONL / Parquet / ArrayRecord files with a 'text' "
        "field (default: eval.data, the held-out arithmetic problems and code files)",
    )
    ev.add_argument(
        "--tasks",
        nargs="*",
        default=[],
        action=_ValuesAndOverrides,
        help="benchmark tasks: built-in arithmetic / arithmetic_choice / chat_arithmetic, task YAML files "
        "(frontier_jax/eval/tasks.py), or chat prompt sets of prompt/answer rows (.jsonl, eval/chat.py)",
    )
    ev.add_argument(
        "--preferences",
        default=None,
        help="a reward model's pairwise accuracy and mean margin on a JSONL of {prompt, chosen, rejected} "
        "pairs (instead of perplexity and tasks)",
    )
    ev.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="parameter dtype on load")
    ev.add_argument("--devices", type=int, default=None, help="evaluate on the first N devices (default all)")
    ev.add_argument("--out", default="eval-results", help="directory of results.json")
    ev.add_argument(
        "--distributed", action="store_true", help="multi-process: jax.distributed.initialize() first"
    )
    ev.add_argument(
        "overrides",
        nargs="*",
        default=[],
        action=_ValuesAndOverrides,
        help="mesh.* / eval.* / impl.* overrides, e.g. eval.stride=64 mesh.tensor=2 (also after --data / "
        "--tasks; expert dispatch is dropless unless impl.moe_dispatch is given)",
    )
    ev.set_defaults(func=_eval)

    ab = sub.add_parser("ablate", help="arms x seeds of a training config, held-out eval, table and plots")
    ab.add_argument("--config", required=True, help="ablation YAML, e.g. ablations/toy-mtp.yaml")
    ab.add_argument(
        "--out",
        default=None,
        help="output directory (default runs/ablations/NAME); re-running skips finished runs",
    )
    ab.set_defaults(func=_ablate)

    data = sub.add_parser("data", help="prepare training data (frontier-jax data prepare --help)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="screen and tokenize the config's data sources once into ArrayRecord shards with a "
        "manifest (resumable: run again to finish or repair); writes OUT/config.yaml reading them",
    )
    prep.add_argument("--config", required=True, help="YAML path or name under configs/, e.g. train/toy")
    prep.add_argument("--out", required=True, help="output directory: OUT/<source name>/ per source")
    prep.add_argument(
        "--records-per-shard", type=int, default=None, help="source records per shard (default 10000)"
    )
    prep.add_argument(
        "--max-records",
        type=int,
        default=None,
        help="prepare only the first N records of each source (needed for embedded_math)",
    )
    prep.add_argument(
        "--workers", type=int, default=None, help="processes writing shards in parallel (default 1)"
    )
    prep.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.tokenizer=PATH")
    prep.set_defaults(func=_data_prepare)
    arith = data_sub.add_parser(
        "arithmetic",
        help="write chat arithmetic problems as a prompt set (JSONL rows {prompt, answer}): the held-out "
        "split (a hash bucket of the question, never trained on) or training problems (none held out)",
    )
    arith.add_argument("--split", choices=("held_out", "train"), required=True)
    arith.add_argument("--count", type=int, required=True, help="problems (held_out: distinct questions)")
    arith.add_argument("--out", required=True, help="the JSONL file to write")
    arith.add_argument("--seed", type=int, default=None, help="seed of the draws (default: the split's own)")
    arith.add_argument("--min-operations", type=int, default=1)
    arith.add_argument("--max-operations", type=int, default=1)
    arith.add_argument("--max-operand", type=int, default=99)
    arith.add_argument("--max-factor", type=int, default=12, help="largest factor a product adds")
    arith.set_defaults(func=_data_arithmetic)

    ckpt = sub.add_parser("checkpoint", help="training checkpoints (frontier-jax checkpoint verify --help)")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    verify = ckpt_sub.add_parser(
        "verify",
        help="check every checkpoint step of a run against its checksums: prints ok / corrupt "
        "(the file) / unverified (written before checksums) per step; exit 5 if any is corrupt",
    )
    verify.add_argument(
        "run_dir", help="a training run directory, its checkpoints/ or one checkpoints/<step>"
    )
    verify.set_defaults(func=_checkpoint_verify)

    sub.add_parser(
        "convert", help="Hugging Face DeepseekV3 checkpoints in and out (frontier-jax convert --help)"
    )
    from frontier_jax.infer.cli import add_generate_parser

    add_generate_parser(sub)
    from frontier_jax.posttrain.cli import add_rejection_parser, add_rewards_parser

    add_rewards_parser(sub)
    add_rejection_parser(sub)
    from frontier_jax.posttrain.grpo_cli import add_grpo_parser

    add_grpo_parser(sub, _grpo)
    from frontier_jax.runtime.expert_cli import add_experts_parser

    add_experts_parser(sub)
    from frontier_jax.serve.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def _exit_code(err: Exception) -> int | None:
    """The exit code of an error a user can cause (README "When things go wrong"), None for a bug."""
    from frontier_jax.data import DataError
    from frontier_jax.runtime.integrity import CheckpointError
    from frontier_jax.train.loop import NonFiniteLossError
    from frontier_jax.train.run_lock import RunLockedError
    from frontier_jax.train.signals import EXIT_PREEMPTED, Preempted

    codes = (
        (Preempted, EXIT_PREEMPTED),
        (NonFiniteLossError, EXIT_NONFINITE),
        (DataError, EXIT_DATA),
        (CheckpointError, EXIT_CHECKPOINT),
        (RunLockedError, EXIT_LOCKED),
        ((ValueError, OSError), EXIT_USAGE),
    )
    return next((code for kind, code in codes if isinstance(err, kind)), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["convert"]:  # its own parser (check / export sub-commands)
            from frontier_jax.convert.cli import main as convert_main

            return convert_main(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command in (
            "eval",
            "generate",
            "checkpoint",
            "rewards",
            "rejection-sample",
            "experts",
            "serve",
        ):
            _configure_logging(False)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: stopped by Ctrl-C (SIGINT)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        code = _exit_code(err)
        if code is None:
            raise
        from frontier_jax.train.signals import EXIT_PREEMPTED

        print(f"{'preempted' if code == EXIT_PREEMPTED else 'error'}: {str(err).strip()}", file=sys.stderr)
        return code
