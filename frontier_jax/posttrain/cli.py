"""`frontier-jax rewards score` and `frontier-jax rejection-sample`.

    frontier-jax rewards score --rewards math,format:0.2 --in completions.jsonl --out scored.jsonl

Each input row holds `prompt`, `completion` and gold columns (`answer`, `tests`, ...); each is
written back with one field per reward function (its name; null for None) and the weighted
`reward`.  The counts of None per function are printed.  `--rewards model` scores with a reward
model: `--reward-model RUN` names its run directory.

    frontier-jax rejection-sample --checkpoint RUN --prompts FILE --n 8 --rewards math --out sft.jsonl

samples n completions per prompt (`posttrain/sampling.py`), keeps them by the rules of
`posttrain/rejection.py` and writes `{"prompt", "response"}` records, `OUT.stats.jsonl` (one line
per prompt) and `OUT.summary.json`; run again with the same arguments to resume.  `--pairs-out
PAIRS` also writes reward-model preference pairs from the same samples, `{"prompt", "chosen",
"rejected"}`: a kept sample (else `--gold-response`, e.g. '<answer>{answer}</answer>' over the
row's columns) against a wrong one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

from frontier_jax.data.jsonl import read_jsonl_objects
from frontier_jax.posttrain.rewards import RewardsConfig, RewardSet

_BATCH = 64


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Every row of a JSONL file (`data.jsonl.read_jsonl_objects`); a row that lacks a required
    string field is an error naming the file and line."""
    try:
        numbered = read_jsonl_objects(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    for number, row in numbered:
        missing = [field for field in required if not isinstance(row.get(field), str)]
        if missing:
            raise ValueError(f"{path}:{number}: no string field {', '.join(repr(f) for f in missing)}")
    return [row for _, row in numbered]


def score_rows(reward_set: RewardSet, rows: list[dict]) -> list[dict]:
    """The rows with one field per reward function and the weighted `reward`."""
    columns = sorted({key for row in rows for key in row} - {"prompt", "completion"})
    scores = reward_set.score(
        [row["prompt"] for row in rows],
        [row["completion"] for row in rows],
        **{column: [row.get(column) for row in rows] for column in columns},
    )
    out = []
    for i, row in enumerate(rows):
        scored = dict(row)
        scored.update({name: values[i] for name, values in scores.by_function.items()})
        scored["reward"] = scores.reward[i]
        out.append(scored)
    return out


def with_model_checkpoint(config: RewardsConfig, checkpoint: str | None) -> RewardsConfig:
    """`--reward-model RUN` as the `checkpoint` option of the `model` entry of `--rewards`."""
    names = [spec.name for spec in config.functions]
    if ("model" in names) != (checkpoint is not None):
        raise ValueError(
            "--rewards model and --reward-model RUN go together (the reward model's run directory)"
        )
    functions = tuple(
        dataclasses.replace(spec, options={"checkpoint": checkpoint}) if spec.name == "model" else spec
        for spec in config.functions
    )
    return dataclasses.replace(config, functions=functions)


def _score(args: argparse.Namespace) -> int:
    config = with_model_checkpoint(
        RewardsConfig.parse_names(
            args.rewards, unconfined_sandbox=args.unconfined_sandbox, workers=args.workers
        ),
        args.reward_model,
    )
    rows = read_jsonl(args.input, ("prompt", "completion"))
    with RewardSet(config) as reward_set:
        scored = [
            r
            for start in range(0, len(rows), _BATCH)
            for r in score_rows(reward_set, rows[start : start + _BATCH])
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored), encoding="utf-8")
    tmp.replace(out)
    names = [spec.name for spec in config.functions]
    nones = {name: sum(row[name] is None for row in scored) for name in names}
    masked = sum(row["reward"] is None for row in scored)
    print(f"scored {len(scored)} rows -> {out}")
    print(
        "None per function: "
        + ", ".join(f"{name} {count}" for name, count in nones.items())
        + f"; reward None (masked): {masked}"
    )
    return 0


def _prompts_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rejection_sample(args: argparse.Namespace) -> int:
    from frontier_jax.infer import Engine, SamplingParams
    from frontier_jax.posttrain.chat import run_template
    from frontier_jax.posttrain.rejection import KeepRules, PairRules, Writer
    from frontier_jax.posttrain.sampling import sample_and_keep
    from frontier_jax.runtime.restore import saved_config

    rules = KeepRules(
        threshold=args.threshold,
        require_format=args.require_format,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        max_per_prompt=args.max_per_prompt,
        weight=args.weight,
        keep_truncated=args.keep_truncated,
    ).check()
    pairs = (
        PairRules(per_prompt=args.pairs_per_prompt, gold_response=args.gold_response).check()
        if args.pairs_out
        else None
    )
    if pairs is None and args.gold_response is not None:
        raise ValueError("--gold-response is the chosen side of preference pairs: give --pairs-out too")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        n=args.n,
    )
    params.check()
    config = with_model_checkpoint(
        RewardsConfig.parse_names(
            args.rewards, unconfined_sandbox=args.unconfined_sandbox, workers=args.workers
        ),
        args.reward_model,
    )
    rows = read_jsonl(args.prompts, ("prompt",))
    settings = {
        "checkpoint": str(args.checkpoint),
        "prompts_sha256": _prompts_digest(args.prompts),
        "sampling": dataclasses.asdict(params),
        "rewards": [dataclasses.asdict(spec) for spec in config.functions],
        "rules": dataclasses.asdict(rules),
        "batch_prompts": args.batch_prompts,
        "pairs": None if pairs is None else {"out": str(args.pairs_out), **dataclasses.asdict(pairs)},
    }
    with RewardSet(config) as rewards:
        writer = Writer(args.out, settings, args.pairs_out)
        if writer.done:
            print(f"resuming after {writer.done} of {len(rows)} prompts")
        engine = Engine.from_checkpoint(
            args.checkpoint, infer={"max_len": args.max_len} if args.max_len else None
        )
        summary = sample_and_keep(
            engine,
            engine.tokenizer,
            run_template(saved_config(args.checkpoint)[1]),
            rows,
            rewards,
            rules,
            writer,
            params,
            batch_prompts=args.batch_prompts,
            pairs=pairs,
        )
    out = Path(args.out)
    summary_path = out.with_name(out.name + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"{summary['prompts']} prompts x {args.n}: pass@{args.n} {summary['pass_at_n']:.3f}, pass rate "
        f"{summary['pass_rate']:.3f}, unscored {summary['unscored']}; kept {summary['kept']} records from "
        f"{summary['prompts_with_kept']} prompts (tokens mean {summary['kept_tokens_mean']:.1f}, "
        f"{summary['kept_tokens_min']}..{summary['kept_tokens_max']}) -> {out}; statistics {writer.stats_path}, {summary_path}"
    )
    if pairs is not None:
        print(f"{summary['pairs']} preference pairs -> {args.pairs_out}")
    return 0


def add_rewards_parser(sub) -> None:
    rewards = sub.add_parser("rewards", help="reward functions (frontier-jax rewards score --help)")
    rewards_sub = rewards.add_subparsers(dest="rewards_command", required=True)
    score = rewards_sub.add_parser(
        "score",
        help="score a JSONL of prompt / completion / gold columns: one field per reward function "
        "(null for None) and the weighted `reward`; prints the None counts",
    )
    score.add_argument(
        "--rewards",
        required=True,
        help="NAME[:WEIGHT],...  e.g. math,format:0.2 (math, format, exact, code, model)",
    )
    score.add_argument(
        "--in", dest="input", required=True, help="JSONL rows with prompt, completion, answer / tests ..."
    )
    score.add_argument("--out", required=True, help="the scored JSONL")
    score.add_argument("--reward-model", help="the `model` reward's checkpoint (a reward model's run)")
    score.add_argument(
        "--workers", type=int, default=2, help="processes / sandboxes run at once (math, code)"
    )
    score.add_argument(
        "--unconfined-sandbox",
        action="store_true",
        help="run `code` with rlimits only where no confining sandbox exists (rewards.unconfined_sandbox)",
    )
    score.set_defaults(func=_score)


def add_rejection_parser(sub) -> None:
    rs = sub.add_parser(
        "rejection-sample",
        help="n samples per prompt from a checkpoint, scored by reward functions, kept by rules, written as "
        "{prompt, response} SFT records (resumable: run the same command again)",
    )
    rs.add_argument("--checkpoint", required=True, help="a training run directory (or RUN/checkpoints/STEP)")
    rs.add_argument(
        "--prompts", required=True, help="JSONL rows with `prompt` and gold columns (answer, tests, ...)"
    )
    rs.add_argument(
        "--out",
        required=True,
        help="the kept records (JSONL); OUT.stats.jsonl and OUT.summary.json beside it",
    )
    rs.add_argument("--rewards", required=True, help="NAME[:WEIGHT],...  e.g. math or math,format:0.2")
    rs.add_argument("--n", type=int, default=8, help="samples per prompt")
    rs.add_argument("--temperature", type=float, default=1.0)
    rs.add_argument("--top-p", type=float, default=1.0)
    rs.add_argument("--max-new-tokens", type=int, default=64)
    rs.add_argument("--seed", type=int, default=0, help="prompt i draws with seed + i n (+ j for sample j)")
    rs.add_argument(
        "--max-len", type=int, help="infer.max_len (prompt + generation), default: the checkpoint's"
    )
    rs.add_argument(
        "--threshold", type=float, default=1.0, help="keep samples whose weighted reward is >= this"
    )
    rs.add_argument(
        "--require-format", action="store_true", help="keep only [<think>..</think>] text <answer>..</answer>"
    )
    rs.add_argument("--min-tokens", type=int, default=1)
    rs.add_argument("--max-tokens", type=int, help="longest response kept, in tokens")
    rs.add_argument("--max-per-prompt", type=int, default=1, help="k: at most this many records per prompt")
    rs.add_argument(
        "--weight",
        choices=("none", "per_prompt"),
        default="none",
        help="per_prompt: weight 1 / kept per record",
    )
    rs.add_argument(
        "--keep-truncated", action="store_true", help="also keep responses cut at --max-new-tokens"
    )
    rs.add_argument(
        "--pairs-out",
        help="also write preference pairs {prompt, chosen, rejected}: a kept sample against a wrong one",
    )
    rs.add_argument("--pairs-per-prompt", type=int, default=1, help="preference pairs per prompt, at most")
    rs.add_argument(
        "--gold-response",
        help="chosen side where no sample passes: a template over the prompt row, e.g. '<answer>{answer}</answer>'",
    )
    rs.add_argument("--batch-prompts", type=int, default=8, help="prompts generated and scored together")
    rs.add_argument("--reward-model", help="the `model` reward's checkpoint")
    rs.add_argument("--workers", type=int, default=2)
    rs.add_argument("--unconfined-sandbox", action="store_true")
    rs.set_defaults(func=_rejection_sample)
