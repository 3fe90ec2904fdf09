"""Every command of the README's bash blocks, checked as written (tests/readme.py reads them).

A command's program names its kind (KINDS: `frontier-jax <subcommand>`, `python -m <module>`,
`launch/<script>`, `sbatch`, `pip install`); a command of no known kind fails with what to do.

* test_readme_command_parses (every command, default run): frontier-jax's argparse and config
  load (the --config, --mesh preset, key=value overrides, --tasks files; no option may take an
  override as its value), lm-eval's parser and the adapter's model_args, a launch script's shell
  syntax and the frontier-jax command it runs, pytest's options, the extras and constraints file
  of `pip install`. A renamed flag, a missing config or an override that does not parse fails.
* test_readme_command_runs (runnable kinds): the command as a user runs it on jax's one CPU
  device, with bash, in a fresh directory holding the placeholders it reads, with only
  `train.steps=2` / `--max-new-tokens 4` appended; exit 0 and the outputs it promises. The first
  command of each kind runs by default (every `describe`: it compiles nothing), the others are
  marked slow. The README's main command runs at its full length in tests/train/test_cli_demo.py.

Placeholders (the paths a user following the README has) are made once per test run, in a
directory shared by the xdist workers: runs/toy, data/toy and held_out_prompts.jsonl by the first
command run here that writes them (so the eval / generate commands read what the README's train
command wrote), runs/toy-experts, serve_load.npz and runs/sft from runs/toy (MADE_FROM_TOY: a
60-step run costs minutes), the others by the small functions below. A command's XLA_FLAGS is added to the tests' compile-speed
flags (tests/conftest.py), which change no result.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from tests.readme import REPO, Command, main_command, prepare_directory, readme_commands, run_command
from tests.train.common import run_lock, shared_test_dir, subprocess_env

OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")  # a dotted key=value override
TRAIN_STEPS = 2
NEW_TOKENS = 4
SHELL_OPERATORS = "|&<>()"  # a word of these alone is a pipe, redirection, background job or subshell
READ_WHEN_PARSED = ("--config", "--mesh", "--tasks", "--include_path")  # files that parsing reads


# ---------------------------------------------------------------- parse checks (raise AssertionError)
def _parse_frontier_jax_argv(argv: list[str]) -> None:
    """frontier-jax's argparse, then the config as the command loads it."""
    from frontier_jax.cli import build_parser
    from frontier_jax.config import load_config
    from frontier_jax.eval.tasks import resolve_task

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"frontier-jax refuses the arguments: {stderr.getvalue().strip()}") from None
    overrides = list(getattr(args, "overrides", []) or [])
    dotted = [w for w in argv if OVERRIDE.match(w)]
    assert overrides == dotted, f"an option took key=value overrides as its values: overrides {overrides}"
    try:
        load_config(getattr(args, "config", None), overrides)
        if getattr(args, "mesh", None):
            load_config(args.mesh)
        for task in getattr(args, "tasks", None) or []:
            resolve_task(task)
    except Exception as err:
        raise AssertionError(f"{type(err).__name__}: {err}") from err


def _parse_frontier_jax(command: Command) -> None:
    _parse_frontier_jax_argv(list(command.program[1:]))


# launch script -> (the frontier-jax subcommand it runs, the options its leading arguments fill;
# None: an argument of the launcher itself, e.g. a TPU name)
LAUNCHED = {
    "launch/local.sh": ("train", ("--config", "--run-dir")),
    "launch/slurm_gpu.sbatch": ("train", ("--config", "--run-dir")),
    "launch/tpu_vm.sh": ("train", (None, None, "--config", "--run-dir")),
    "launch/eval_local.sh": ("eval", ("--checkpoint", "--out")),
    "launch/eval_slurm_gpu.sbatch": ("eval", ("--checkpoint", "--out")),
    "launch/eval_tpu_vm.sh": ("eval", (None, None, "--checkpoint", "--out")),
    "launch/serve_local.sh": ("serve", ("--checkpoint",)),
}


def _launched_argv(command: Command) -> list[str]:
    """The frontier-jax arguments that the command's launch script runs (`sbatch [options] SCRIPT
    ARGS` or `SCRIPT ARGS`)."""
    words = list(command.argv[1:] if command.argv[0] == "sbatch" else command.argv)
    while words and words[0].startswith("-"):  # sbatch's options
        words.pop(0)
    script, args = words[0], words[1:]
    assert script in LAUNCHED, f"{script}: not a launch script this test knows (LAUNCHED)"
    subcommand, options = LAUNCHED[script]
    assert len(args) >= len(options), f"{script} takes {len(options)} leading arguments, got {args}"
    filled = [w for option, arg in zip(options, args) if option for w in (option, arg)]
    return [subcommand, *filled, *args[len(options) :]]


def _parse_launcher(command: Command) -> None:
    """The script exists and is valid shell; the frontier-jax command it runs parses."""
    script = next(w for w in command.argv if w.startswith("launch/"))
    syntax = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert syntax.returncode == 0, f"{script}: {syntax.stderr.strip() or 'not valid bash'}"
    _parse_frontier_jax_argv(_launched_argv(command))


def _parse_lm_eval(command: Command) -> None:
    """lm-eval's own parser (`python -m frontier_jax.eval.lm_eval` or its `lm_eval` console
    script); the task folder exists; model_args are the adapter's arguments."""
    import inspect

    from lm_eval.__main__ import HarnessCLI
    from lm_eval.utils import simple_parse_args_string

    from frontier_jax.eval.lm_eval import FrontierJaxLM

    first = 1 if command.argv[0] == "lm_eval" else 3
    argv, stderr = ["lm-eval", *command.argv[first:]], io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), mock.patch.object(sys, "argv", argv):
            args = HarnessCLI().parse_args()
    except SystemExit:
        raise AssertionError(f"lm-eval refuses the arguments: {stderr.getvalue().strip()}") from None
    if args.include_path:
        assert Path(args.include_path).is_dir(), f"--include_path {args.include_path}: no such folder"
    if args.model == "frontier_jax":
        given = (
            args.model_args
            if isinstance(args.model_args, dict)
            else simple_parse_args_string(args.model_args)
        )
        parameters = inspect.signature(FrontierJaxLM).parameters.values()
        known = [p.name for p in parameters if p.kind is not p.VAR_KEYWORD]
        unknown = sorted(set(given) - set(known))
        assert not unknown, f"model_args {unknown} are not arguments of the frontier_jax model ({known})"


class _Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args once a script's arguments parsed."""


def _parse_script(command: Command) -> None:
    """`python SCRIPT ARGS`: the script exists and its own argparse accepts ARGS (it runs up to
    its parse_args call, in this process, and stops there)."""
    import argparse
    import runpy

    script = command.argv[1]
    assert (REPO / script).is_file(), f"{script}: no such file"
    parse_args, stderr = argparse.ArgumentParser.parse_args, io.StringIO()

    def parse_then_stop(parser, *args, **kwargs):
        parse_args(parser, *args, **kwargs)
        raise _Parsed

    try:
        with (
            contextlib.redirect_stderr(stderr),
            mock.patch.object(sys, "argv", [script, *command.argv[2:]]),
            mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop),
        ):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except _Parsed:
        return
    except SystemExit:
        raise AssertionError(f"{script} refuses the arguments: {stderr.getvalue().strip()}") from None
    raise AssertionError(f"{script}: parses no arguments (no argparse parse_args call)")


def _parse_curl(command: Command) -> None:
    """A request to the README's `frontier-jax serve`: options this check knows, the URL on the
    port a README serve command listens on, a JSON body."""
    words, url, body = list(command.argv[1:]), None, None
    while words:
        word = words.pop(0)
        if word in ("-d", "--data", "-H", "--header"):
            value = words.pop(0)
            body = value if word in ("-d", "--data") else body
        elif word.startswith("http"):
            url = word
        elif word not in ("-N", "--no-buffer", "-s", "--silent"):
            raise AssertionError(f"curl option {word}: unknown to this check (tests/test_readme_commands.py)")
    ports = {c.option("--port") or "8000" for c in COMMANDS if c.program[:2] == ("frontier-jax", "serve")}
    assert url and any(url.startswith(f"http://127.0.0.1:{port}/v1/") for port in ports), (
        f"{url}: not a /v1/ route of a README serve command (ports {sorted(ports)})"
    )
    if body is not None:
        try:
            json.loads(body)
        except json.JSONDecodeError as err:
            raise AssertionError(f"-d: not JSON ({err})") from None


def _parse_pytest(command: Command) -> None:
    """pytest's own option parsing (and its plugins': -n needs pytest-xdist), in the repository
    root with its configuration, collecting nothing (every file ignored; exit 5)."""
    proc = subprocess.run(
        [sys.executable, *command.argv[1:], "--collect-only", "-p", "no:cacheprovider", "--ignore-glob=*"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 5), (
        f"pytest refuses the arguments (exit {proc.returncode}): {proc.stderr.strip()}"
    )


def _check_pip_install(command: Command) -> None:
    """Installs nothing: the project paths have a pyproject.toml that defines the extras named,
    a package named by its name is installed here with the extras named, and the constraints /
    requirements files exist."""
    words, i = list(command.argv[2:]), 0
    while i < len(words):
        word = words[i]
        if word in ("-c", "--constraint", "-r", "--requirement"):
            assert (REPO / words[i + 1]).is_file(), f"{word} {words[i + 1]}: no such file"
            i += 2
            continue
        if word in ("-e", "--editable"):
            i += 1
            word = words[i]
        elif word.startswith("-"):
            raise AssertionError(f"pip option {word}: unknown to this check (tests/test_readme_commands.py)")
        path, _, extras = word.partition("[")
        if not path.startswith("."):
            _check_installed(word)
            i += 1
            continue
        pyproject = REPO / path / "pyproject.toml"
        assert pyproject.is_file(), f"{word}: no pyproject.toml in {path}"
        defined = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
        missing = sorted({e.strip() for e in extras.rstrip("]").split(",") if e.strip()} - set(defined))
        assert not missing, f"{word}: extras {missing} are not in pyproject.toml ({sorted(defined)})"
        i += 1


def _check_installed(requirement: str) -> None:
    """`name[extras]`: the distribution is installed (the CI environment has what the README
    asks a user to install) and declares those extras."""
    from importlib import metadata

    from packaging.requirements import Requirement

    req = Requirement(requirement)
    try:
        declared = metadata.distribution(req.name).metadata.get_all("Provides-Extra") or []
    except metadata.PackageNotFoundError:
        raise AssertionError(f"{requirement}: {req.name} is not installed in the test environment") from None
    missing = sorted(req.extras - set(declared))
    assert not missing, f"{requirement}: extras {missing} are not extras of {req.name}"


# ---------------------------------------------------------------- output checks of a run
def _frontier_args(command: Command):
    from frontier_jax.cli import build_parser

    argv = _launched_argv(command) if command.program[0] != "frontier-jax" else list(command.program[1:])
    return build_parser().parse_args(argv)


def _trained(command: Command, cwd: Path, proc) -> None:
    run_dir = cwd / _frontier_args(command).run_dir
    assert f"done: step {TRAIN_STEPS}" in proc.stdout, proc.stdout
    assert (run_dir / "checkpoints" / str(TRAIN_STEPS)).is_dir(), sorted((run_dir / "checkpoints").iterdir())


def _described(command: Command, cwd: Path, proc) -> None:
    assert proc.stdout.startswith("model "), proc.stdout


def _prepared(command: Command, cwd: Path, proc) -> None:
    config = cwd / _frontier_args(command).out / "config.yaml"
    assert config.is_file() and f"--config {config.relative_to(cwd)}" in proc.stdout, proc.stdout


def _evaluated(command: Command, cwd: Path, proc) -> None:
    """results.json in --out, with the window, stride, mesh, data files and tasks asked for."""
    args = _frontier_args(command)
    results = json.loads((cwd / args.out / "results.json").read_text())
    if getattr(args, "preferences", None):  # eval --preferences (from the `pt-sft` branch)
        assert "preferences" in results, sorted(results)
        return
    given = dict(o.split("=", 1) for o in args.overrides)
    for key, field in (("eval.seq_len", "window"), ("eval.stride", "stride")):
        if key in given:
            assert results[field] == int(given[key]), (key, results[field])
    for key, value in given.items():
        if key.startswith("mesh."):
            assert results["mesh"][key[len("mesh.") :]] == int(value), (key, results["mesh"])
    assert set(results["tasks"]) == set(args.tasks)
    assert {Path(d).stem for d in args.data} <= set(results["datasets"]), results["datasets"].keys()


def _generated(command: Command, cwd: Path, proc) -> None:
    """One completion per prompt: the --out lines in prompt order, else printed."""
    args = _frontier_args(command)
    prompts = args.prompt or (cwd / args.prompts).read_text().splitlines()
    if args.out:
        lines = [json.loads(line) for line in (cwd / args.out).read_text().splitlines()]
        assert [line["index"] for line in lines] == list(range(len(prompts))), lines
        assert all(line["finish_reason"] != "error" for line in lines), lines
    else:
        assert proc.stdout.count("---") == len(prompts), proc.stdout


def _verified(command: Command, cwd: Path, proc) -> None:
    """A verdict per step, every one ok (the placeholder runs are intact)."""
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert steps and all(line.endswith(": ok") for line in steps), proc.stdout


def _held_out_prompts(command: Command, cwd: Path, proc) -> None:
    """--out: one {"prompt": text} per line, as many as printed, each a prompt `generate` reads."""
    lines = [json.loads(line) for line in (cwd / command.option("--out")).read_text().splitlines()]
    assert lines and f"{len(lines)} prompts" in proc.stdout, proc.stdout
    assert all(list(line) == ["prompt"] and line["prompt"] for line in lines), lines[:3]


def _planned(command: Command, cwd: Path, proc) -> None:
    """Max / mean per device printed before and after; the plan file (if --out) has a slot per
    expert and replica on every layer."""
    assert "before" in proc.stdout and "after" in proc.stdout, proc.stdout
    if command.option("--out"):
        plan = json.loads((cwd / command.option("--out")).read_text())
        layers = plan["physical_to_logical"]
        assert layers and all(
            len(row) == len(plan["copies"][0]) + int(command.option("--replicas")) for row in layers
        )


def _plotted(command: Command, cwd: Path, proc) -> None:
    png = (cwd / command.option("--out")).read_bytes()
    assert png.startswith(b"\x89PNG"), png[:8]


def _scored(command: Command, cwd: Path, proc) -> None:
    """A row per input row with a field per reward function and the weighted reward."""
    rows = (cwd / command.option("--in")).read_text().splitlines()
    scored = [json.loads(line) for line in (cwd / command.option("--out")).read_text().splitlines()]
    names = [n.split(":")[0] for n in command.option("--rewards").split(",")]
    assert len(scored) == len(rows) and all({*names, "reward"} <= set(row) for row in scored), scored
    assert f"scored {len(rows)} rows" in proc.stdout, proc.stdout


def _rejection_sampled(command: Command, cwd: Path, proc) -> None:
    """The records file, a statistics line per prompt (after the settings line) and the summary
    over every prompt."""
    out = cwd / command.option("--out")
    prompts = (cwd / command.option("--prompts")).read_text().splitlines()
    lines = [json.loads(line) for line in out.with_name(out.name + ".stats.jsonl").read_text().splitlines()]
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    indices = [line["index"] for line in lines if "index" in line]
    assert out.is_file() and indices == list(range(len(prompts))) == list(range(summary["prompts"])), lines


def _grpo_trained(command: Command, cwd: Path, proc) -> None:
    """As a training run, plus the reward curve and the rollout figures in metrics.jsonl."""
    _trained(command, cwd, proc)
    run_dir = cwd / _frontier_args(command).run_dir
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"grpo/reward_mean", "entropy", "grpo/gap_mean"} <= set(last), sorted(last)
    assert (run_dir / "grpo.png").read_bytes().startswith(b"\x89PNG")


def _prompt_set(command: Command, cwd: Path, proc) -> None:
    """--out: --count {"prompt", "answer"} rows."""
    rows = [json.loads(line) for line in (cwd / command.option("--out")).read_text().splitlines()]
    assert len(rows) == int(command.option("--count")), len(rows)
    assert all({"prompt", "answer"} <= set(row) for row in rows), rows[:3]


def _lm_evaluated(command: Command, cwd: Path, proc) -> None:
    tasks = command.argv[command.argv.index("--tasks") + 1].split(",")
    assert all(f"|{task}" in proc.stdout for task in tasks), proc.stdout


# ---------------------------------------------------------------- kinds
@dataclass(frozen=True)
class Kind:
    parse: Callable[[Command], None]  # raises AssertionError naming what is wrong
    outputs: Callable | None = None  # (command, cwd, completed process) -> asserts; None: parsed only
    append: tuple[str, ...] = ()  # what a run appends, to keep it short
    every_run_by_default: bool = False  # cheap: not only the first of the kind runs by default
    not_run: str = ""  # why a parsed-only kind is not run


KINDS = {
    ("frontier-jax", "train"): Kind(_parse_frontier_jax, _trained, (f"train.steps={TRAIN_STEPS}",)),
    ("frontier-jax", "describe"): Kind(_parse_frontier_jax, _described, every_run_by_default=True),
    ("frontier-jax", "data", "prepare"): Kind(_parse_frontier_jax, _prepared),
    ("frontier-jax", "eval"): Kind(_parse_frontier_jax, _evaluated),
    ("frontier-jax", "generate"): Kind(
        _parse_frontier_jax, _generated, ("--max-new-tokens", str(NEW_TOKENS))
    ),
    ("frontier-jax", "checkpoint", "verify"): Kind(_parse_frontier_jax, _verified),
    ("python", "-m", "frontier_jax.eval.lm_eval"): Kind(_parse_lm_eval, _lm_evaluated),
    ("launch/local.sh",): Kind(_parse_launcher, _trained, (f"train.steps={TRAIN_STEPS}",)),
    ("launch/eval_local.sh",): Kind(_parse_launcher, _evaluated),
    ("sbatch",): Kind(_parse_launcher, not_run="needs a SLURM cluster"),
    ("launch/tpu_vm.sh",): Kind(_parse_launcher, not_run="needs a Cloud TPU slice"),
    ("launch/eval_tpu_vm.sh",): Kind(_parse_launcher, not_run="needs a Cloud TPU slice"),
    ("pip", "install"): Kind(_check_pip_install, not_run="installs packages"),
    ("python", "-m", "pytest"): Kind(_parse_pytest, not_run="the test suite itself"),
    ("python", "benchmarks/held_out_prompts.py"): Kind(_parse_script, _held_out_prompts),
    ("frontier-jax", "experts", "plan"): Kind(_parse_frontier_jax, _planned, every_run_by_default=True),
    ("frontier-jax", "experts", "plot"): Kind(_parse_frontier_jax, _plotted, every_run_by_default=True),
    ("frontier-jax", "rewards", "score"): Kind(_parse_frontier_jax, _scored),
    ("frontier-jax", "rewards", "score", "--rewards", "model"): Kind(
        _parse_frontier_jax,
        not_run="needs a trained reward model (runs/rm, model.head=scalar); the `model` reward runs in "
        "tests/train/test_model_reward.py, `rewards score` in tests/posttrain/test_rewards.py",
    ),
    ("frontier-jax", "rejection-sample"): Kind(
        _parse_frontier_jax, _rejection_sampled, ("--max-new-tokens", str(NEW_TOKENS))
    ),
    ("frontier-jax", "grpo"): Kind(_parse_frontier_jax, _grpo_trained, (f"train.steps={TRAIN_STEPS}",)),
    # chat arithmetic prompt sets (from the `pt-sft` branch)
    ("frontier-jax", "data", "arithmetic"): Kind(_parse_frontier_jax, _prompt_set, every_run_by_default=True),
    # the serving commands (from the `serve` branch): a server runs until stopped, its clients
    # need it running; tests/serve start one and send these requests
    ("frontier-jax", "serve"): Kind(
        _parse_frontier_jax, not_run="a server: runs until stopped (tests/serve)"
    ),
    ("curl",): Kind(
        _parse_curl, not_run="a request to `frontier-jax serve` (tests/serve send it to a live server)"
    ),
    ("lm_eval",): Kind(
        _parse_lm_eval, not_run="lm-eval against `frontier-jax serve` (tests/serve run it on a live server)"
    ),
    ("launch/serve_local.sh",): Kind(
        _parse_launcher,
        not_run="a server: runs until stopped (tests/serve/test_distributed.py serves from 2 processes)",
    ),
    ("python", "benchmarks/serve_load.py"): Kind(
        _parse_script, not_run="load on `frontier-jax serve` (tests/serve run it on a live server)"
    ),
}


def kind_of(command: Command) -> tuple[str, ...] | None:
    """The longest KINDS key that begins the command's program, None for an unknown program."""
    if any(word and set(word) <= set(SHELL_OPERATORS) for word in command.words):
        return None
    keys = [k for k in KINDS if command.program[: len(k)] == k]
    return max(keys, key=len) if keys else None


def _unknown(command: Command) -> str:
    return (
        f"{command}\n  no kind for this command: add its program to KINDS in "
        "tests/test_readme_commands.py, with a parse check and either the outputs a run checks "
        "(and the placeholders it reads in MADE_HERE / MADE_BY_README) or why it is parsed only; "
        "pipes and redirections are not run: write plain commands (joined by && or ;)"
    )


# ---------------------------------------------------------------- placeholders
def _held_out(path: Path) -> None:
    from tests.eval.common import DOCUMENTS

    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))


def _prompts(path: Path) -> None:
    """The two forms of a prompts line: text and token ids."""
    path.write_text(
        json.dumps({"prompt": "def fib(n):"}) + "\n" + json.dumps({"prompt_ids": [100, 101, 102]}) + "\n"
    )


def _lm_eval_tasks(path: Path) -> None:
    """An lm-eval task folder: `my_task`, multiple choice over two local rows."""
    path.mkdir()
    rows = [
        {"question": "Q: 2 + 3 = ?\nA:", "choices": [" 5", " 6"], "answer": 0},
        {"question": "Q: 7 - 4 = ?\nA:", "choices": [" 2", " 3"], "answer": 1},
    ]
    (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "my_task.yaml").write_text(
        f"task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path / 'rows.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list: [{metric: acc}]\n"
    )


def _hf_model(path: Path) -> None:
    """A tiny random Hugging Face DeepseekV3 with an MTP layer (for --speculative mtp), the byte
    tokenizer as tokenizer.json and a 4096-token context (the README's infer.max_len)."""
    from frontier_jax.data.tokenizer import byte_tokenizer
    from tests.convert.helpers import write_mtp_checkpoint

    write_mtp_checkpoint(str(path), depth=1, vocab_size=272, max_position_embeddings=4096)
    (path / "tokenizer.json").write_text(byte_tokenizer().to_str())


def _samples(path: Path) -> None:
    """Rows to score: a prompt, a completion and the gold answer (one right, one wrong)."""
    rows = [
        {"prompt": "What is 2 + 3?", "completion": "<answer>5</answer>", "answer": "5"},
        {"prompt": "What is 7 - 4?", "completion": "4", "answer": "3"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pairs(path: Path) -> None:
    """Preference pairs: a prompt, a right (chosen) and a wrong (rejected) answer."""
    rows = [
        {
            "prompt": f"What is {a} + {b}?",
            "chosen": f"<answer>{a + b}</answer>",
            "rejected": f"<answer>{a + b + 1}</answer>",
        }
        for a, b in ((2, 3), (7, 4), (10, 9), (6, 6))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rejection_sampled_records(path: Path) -> None:
    """Rejection-sampled SFT records: prompts with their kept (right) responses."""
    rows = [
        {"prompt": f"What is {a} + {b}?", "response": f"<answer>{a + b}</answer>"}
        for a, b in ((2, 3), (7, 4))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _math_prompts(path: Path) -> None:
    """Prompts with their gold answers."""
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 7 - 4?", "answer": "3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _experts_run(path: Path, toy: Path) -> None:
    """The README's 60-step run `runs/toy-experts` as the files its commands read: the toy run
    with its last checkpoint as step 60."""
    import shutil

    shutil.copytree(toy, path)
    last = max((path / "checkpoints").iterdir(), key=lambda step: int(step.name))
    last.rename(path / "checkpoints" / "60")


def _serve_load(path: Path, toy: Path) -> None:
    """An expert-load window (the format `generate --expert-stats` writes): the toy run's last."""
    import shutil

    last = max((toy / "checkpoints").iterdir(), key=lambda step: int(step.name))
    shutil.copy(last / "expert_load.npz", path)


def _sft_run(path: Path, toy: Path) -> None:
    """A run to sample from: the toy run."""
    path.symlink_to(toy)


# README path -> the function that makes it (at the path it is given)
MADE_HERE = {
    "held_out.jsonl": _held_out,
    "prompts.jsonl": _prompts,
    "samples.jsonl": _samples,
    "math_prompts.jsonl": _math_prompts,
    "pairs.jsonl": _pairs,
    "held_out_pairs.jsonl": _pairs,
    "rs_sft.jsonl": _rejection_sampled_records,
    "my_tasks": _lm_eval_tasks,
    "path/to/DeepSeek-V3": _hf_model,
    "path/to/hf_dir": _hf_model,
}
MADE_BY_README = (
    "runs/toy",
    "data/toy",
    "held_out_prompts.jsonl",
    "held_out_math.jsonl",
    "held_out_lt10.jsonl",
    "held_out_mix.jsonl",
    "rs_prompts.jsonl",
    "runs/rm",
    "runs/rm-s1",
)  # made by the first command run here that writes them
# README path -> the function that makes it (at the path it is given) from the README's runs/toy
MADE_FROM_TOY = {
    "runs/toy-experts": _experts_run,
    "serve_load.npz": _serve_load,
    "runs/sft": _sft_run,
    "runs/sft-toy": _sft_run,
    "runs/sft-toy-s1": _sft_run,
    "runs/rs-sft": _sft_run,
    "runs/grpo-s0": _sft_run,
}

COMMANDS = readme_commands()
MAIN = main_command()  # run at full length by tests/train/test_cli_demo.py


def _runs_here(command: Command) -> bool:
    key = kind_of(command)
    return key is not None and KINDS[key].outputs is not None and command != MAIN


PRODUCERS = {
    name: next(c for c in COMMANDS if _runs_here(c) and name in c.outputs) for name in MADE_BY_README
}


def _env() -> dict:
    """A user's machine: jax's one CPU device, offline; a free
    port for the launch scripts' local coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return {**subprocess_env(devices=None), **offline, "COORDINATOR_PORT": str(port)}


def _run(command: Command, cwd: Path, placeholders: Placeholders) -> subprocess.CompletedProcess:
    append = KINDS[kind_of(command)].append
    return run_command(command, cwd, _env(), append, placeholders.links, timeout=1200)


class Placeholders:
    """The README's placeholders, each made on first use, once per test run: in its own folder
    of `root` (shared by the xdist workers), under a lock."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def links(self) -> dict[str, Callable[[], Path]]:
        """README path -> a function returning it here (made on the call)."""
        names = [*MADE_HERE, *MADE_BY_README, *MADE_FROM_TOY]
        return {name: (lambda name=name: self.path(name)) for name in names}

    def path(self, name: str) -> Path:
        if name in MADE_HERE:
            make = MADE_HERE[name]
            return self._made(make.__name__, lambda home: make(home / "made")) / "made"
        if name in MADE_FROM_TOY:
            made_from, toy = MADE_FROM_TOY[name], self.path("runs/toy")
            return self._made(made_from.__name__, lambda home: made_from(home / "made", toy)) / "made"
        home, proc = self.run_of(name)
        assert proc.returncode == 0, f"{name}: {PRODUCERS[name]} failed (see its test)"
        return home / name

    def run_of(self, name: str) -> tuple[Path, subprocess.CompletedProcess]:
        """The run of the README command that makes `name`: the folder it ran in, its process."""
        home = self._made(name.replace("/", "_"), lambda home: self._produce(name, home))
        recorded = json.loads((home / "result.json").read_text())
        return home, subprocess.CompletedProcess(PRODUCERS[name].text, **recorded)

    def _produce(self, name: str, home: Path) -> None:
        proc = _run(PRODUCERS[name], home, self)
        fields = ("returncode", "stdout", "stderr")
        (home / "result.json").write_text(json.dumps({k: getattr(proc, k) for k in fields}))

    def _made(self, folder: str, make: Callable[[Path], None]) -> Path:
        home = self.root / folder
        with run_lock(self.root, folder):
            if not (home / "DONE").exists():
                home.mkdir(parents=True, exist_ok=True)
                make(home)
                (home / "DONE").touch()
        return home


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory) -> Placeholders:
    return Placeholders(shared_test_dir(tmp_path_factory) / "readme")


# ---------------------------------------------------------------- tests
def _id(command: Command) -> str:
    return f"L{command.line}:{' '.join(kind_of(command) or command.program[:2])}"


def _read_when_parsed(command: Command) -> Command:
    """The command's words that its parse check reads files of: the values of READ_WHEN_PARSED."""
    read, taking = [], False
    for word in command.argv:
        if word.startswith("-"):
            taking = word in READ_WHEN_PARSED
        elif taking:
            read.append(word)
    return Command(command.line, tuple(read))


def check_parses(command: Command) -> None:
    """The parse check of the command's kind; AssertionError naming the command and the fault."""
    key = kind_of(command)
    assert key is not None, _unknown(command)
    try:
        KINDS[key].parse(command)
    except AssertionError as err:
        raise AssertionError(f"{command}\n  {err}") from None


@pytest.mark.parametrize("command", COMMANDS, ids=_id)
def test_readme_command_parses(command, placeholders, tmp_path, monkeypatch):
    prepare_directory(_read_when_parsed(command), tmp_path, placeholders.links)
    monkeypatch.chdir(tmp_path)
    check_parses(command)


def test_commands_are_read_as_a_shell_reads_them():
    """Continuation lines joined, comments dropped, && / ; separating commands, VAR=value
    assignments as the environment, quotes removed, blocks indented in a list item included,
    other fences (python, plain) not."""
    text = (
        "```bash\n"
        "pip install -e . && X=1 Y='a b' frontier-jax train --config c \\\n"
        "    --run-dir 'runs/my run' k.v=2   # a comment\n"
        "# a comment line\n"
        "a; b\n"
        "```\n"
        "```python\nimport x\n```\n```\noutput\n```\n"
        "- a list item:\n"
        "  ```bash\n"
        "  frontier-jax describe --config model/toy\n"
        "  ```\n"
    )
    commands = readme_commands(text)
    assert [(c.line, c.words) for c in commands] == [
        (2, ("pip", "install", "-e", ".")),
        (2, ("X=1", "Y=a b", "frontier-jax", "train", "--config", "c", "--run-dir", "runs/my run", "k.v=2")),
        (5, ("a",)),
        (5, ("b",)),
        (15, ("frontier-jax", "describe", "--config", "model/toy")),
    ]
    train = commands[1]
    assert train.env == {"X": "1", "Y": "a b"} and train.argv[:2] == ("frontier-jax", "train")
    assert train.outputs == {"runs/my run"} and train.option("--config") == "c"
    assert readme_commands("```bash\npython -m frontier_jax eval --out o\n```\n")[0].program[:2] == (
        "frontier-jax",
        "eval",
    )


# (a command that passes, the same command broken, what the failure says)
BROKEN = [
    (
        "frontier-jax train --config train/toy --run-dir runs/toy",
        "frontier-jax train --config train/toy --run_dir runs/toy",
        "the following arguments are required: --run-dir",
    ),
    (
        "frontier-jax train --config train/toy --run-dir r train.steps=3",
        "frontier-jax train --config train/toy --run-dir r train.stepz=3",
        "stepz",
    ),
    (
        "frontier-jax describe --config model/toy",
        "frontier-jax describe --config model/tyo",
        "'model/tyo' not found",
    ),
    (
        "frontier-jax describe --config model/toy --mesh mesh/cpu-8",
        "frontier-jax describe --config model/toy --mesh mesh/cpu-9",
        "'mesh/cpu-9' not found",
    ),
    (
        "frontier-jax eval --checkpoint r --tasks arithmetic eval.stride=64",
        "frontier-jax eval --checkpoint r --tasks arithmetic eval.stride=sixty",
        "eval.stride",
    ),
    (
        "frontier-jax generate --checkpoint r --prompt x --speculative mtp infer.max_len=64",
        "frontier-jax generate --checkpoint r --prompt x --speculative mtp infer.max_lenn=64",
        "max_lenn",
    ),
    ("frontier-jax describe --config model/toy", "frontier-jax frobnicate --config model/toy", "no kind"),
    (
        "frontier-jax describe --config model/toy",
        "frontier-jax describe --config model/toy | tee x",
        "no kind",
    ),
    ("pip install -e '.[test]'", "pip install -e '.[tests]'", "extras ['tests'] are not in pyproject.toml"),
    ("pip install -e . -c .ci/constraints.txt", "pip install -e . -c .ci/constraint.txt", "no such file"),
    ("python -m pytest -n 2 -q", "python -m pytest -n 2 -q --no-such-option", "pytest refuses"),
    (
        "sbatch --nodes=2 launch/eval_slurm_gpu.sbatch runs/x results/x mesh.tensor=8",
        "sbatch --nodes=2 launch/eval_slurm_gpu.sbatch runs/x results/x mesh.tensr=8",
        "tensr",
    ),
    (
        "launch/tpu_vm.sh tpu zone train/toy gs://b/runs/x mesh.fsdp=4",
        "launch/tpu_vm.sh tpu zone train/tyo gs://b/runs/x mesh.fsdp=4",
        "'train/tyo' not found",
    ),
    (
        "python -m frontier_jax.eval.lm_eval --model frontier_jax --model_args checkpoint=r,max_length=8 --tasks t",
        "python -m frontier_jax.eval.lm_eval --model frontier_jax --model_args checkpoint=r,max_lenght=8 --tasks t",
        "model_args ['max_lenght']",
    ),
    (
        "python benchmarks/held_out_prompts.py --checkpoint runs/toy --out p.jsonl",
        "python benchmarks/held_out_prompts.py --run-dir runs/toy --out p.jsonl",
        "the following arguments are required: --checkpoint",
    ),
    (
        "python benchmarks/held_out_prompts.py --checkpoint runs/toy --out p.jsonl",
        "python benchmarks/held_out_promps.py --checkpoint runs/toy --out p.jsonl",
        "no kind",
    ),
    (
        "frontier-jax experts plan --stats s.npz --replicas 8 --devices 8 --groups 4 --nodes 2",
        "frontier-jax experts plan --stats s.npz --replicas eight --devices 8 --groups 4 --nodes 2",
        "argument --replicas: invalid int value: 'eight'",
    ),
    (
        "frontier-jax experts plot --stats s.npz --out p.png",
        "frontier-jax experts plots --stats s.npz --out p.png",
        "no kind",
    ),
    (
        "frontier-jax rewards score --rewards model --reward-model runs/rm --in s.jsonl --out o.jsonl",
        "frontier-jax rewards score --rewards model --reward-modle runs/rm --in s.jsonl --out o.jsonl",
        "unrecognized arguments: --reward-modle",
    ),
    (
        "frontier-jax rejection-sample --checkpoint r --prompts p.jsonl --rewards math --out o.jsonl --top-p 1.0",
        "frontier-jax rejection-sample --checkpoint r --prompts p.jsonl --rewards math --out o.jsonl --top_p 1.0",
        "unrecognized arguments: --top_p",
    ),
    (
        "pip install 'lm-eval[api]'",
        "pip install 'lm-eval[apii]'",
        "extras ['apii'] are not extras of lm-eval",
    ),
    ("pip install 'lm-eval[api]'", "pip install 'lm-evall[api]'", "lm-evall is not installed"),
    (
        "lm_eval --model local-completions --tasks t --batch_size 1 --model_args model=toy",
        "lm_eval --model local-completions --tasks t --batch_sizes 1 --model_args model=toy",
        "lm-eval refuses",
    ),
]


@pytest.mark.parametrize("good,broken,message", BROKEN, ids=[b[1] for b in BROKEN])
def test_a_broken_command_fails_its_check(good, broken, message, tmp_path, monkeypatch):
    """The checks can fail: each broken command is refused naming the fault, the command it was
    made from passes."""
    monkeypatch.chdir(tmp_path)
    ((good,), (broken,)) = (readme_commands(f"```bash\n{text}\n```\n") for text in (good, broken))
    check_parses(good)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_parses(broken)


def _costly(command: Command) -> bool:
    """Run only with the slow tests: generating over the 80 held-out prompts (~45 s of CPU more
    than another generate command), the chat evaluation of 500 questions x 16 samples (minutes;
    `tests/eval/test_chat_task.py` runs the chat task on a few rows), rejection sampling over the
    demo's 2,000 training or 500 held-out prompts (`tests/train/test_rejection_sample.py` samples
    three), the reward model's training and evaluation (`tests/train/test_preference.py` trains
    and evaluates one) and GRPO (its rollouts compile the engine's programs beside the trainer's:
    `tests/posttrain/test_grpo.py` runs `frontier-jax grpo` for 30 steps and resumes it) and the
    two-process evaluation launcher (`tests/eval` run multi-process evaluation)."""
    return (
        command.option("--prompts") in ("held_out_prompts.jsonl", "rs_prompts.jsonl", "held_out_math.jsonl")
        or "chat_arithmetic" in command.argv
        or "train.objective=preference" in command.argv
        or command.option("--preferences") is not None
        or command.argv[:2] == ("frontier-jax", "grpo")
        or command.argv[0] == "launch/eval_local.sh"
    )


def _run_params():
    first_of_kind = set()
    for command in COMMANDS:
        if not _runs_here(command):
            continue
        key = kind_of(command)
        default = not _costly(command) and (key not in first_of_kind or KINDS[key].every_run_by_default)
        if not _costly(command):
            first_of_kind.add(key)
        yield pytest.param(command, id=_id(command), marks=() if default else pytest.mark.slow)


@pytest.mark.parametrize("command", list(_run_params()))
def test_readme_command_runs(command, placeholders, tmp_path):
    made = [name for name, producer in PRODUCERS.items() if producer == command]
    if made:  # it ran to make its placeholder, which later commands read
        cwd, proc = placeholders.run_of(made[0])
    else:
        cwd = tmp_path
        proc = _run(command, cwd, placeholders)
    assert proc.returncode == 0, (
        f"{command}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    KINDS[kind_of(command)].outputs(command, cwd, proc)
