"""`frontier-jax rewards score`: score a JSONL of completions with named reward functions.

    frontier-jax rewards score --rewards math,format:0.2 --in completions.jsonl --out scored.jsonl

Each input row holds `prompt`, `completion` and gold columns (`answer`, `tests`, ...); each is
written back with one field per reward function (its name; null for None) and the weighted
`reward`.  The counts of None per function are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from frontier_jax.posttrain.rewards import RewardsConfig, RewardSet

_BATCH = 64


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Every row of a JSONL file; a row that is not a JSON object or lacks a required field is an
    error naming the file and line."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: a row must be a JSON object")
        missing = [field for field in required if not isinstance(row.get(field), str)]
        if missing:
            raise ValueError(f"{path}:{number}: no string field {', '.join(repr(f) for f in missing)}")
        rows.append(row)
    return rows


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
    config = RewardsConfig.parse_names(
        args.rewards, unconfined_sandbox=args.unconfined_sandbox, workers=args.workers
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
    score.add_argument(
        "--workers", type=int, default=2, help="processes / sandboxes run at once (math, code)"
    )
    score.add_argument(
        "--unconfined-sandbox",
        action="store_true",
        help="run `code` with rlimits only where no confining sandbox exists (rewards.unconfined_sandbox)",
    )
    score.set_defaults(func=_score)
