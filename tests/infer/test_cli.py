"""`frontier-jax generate`: JSONL in and out with an imported model (completions written in prompt
order as they finish, kept when the run is interrupted; exit 6 when some requests failed), and
user errors (arguments, prompts files, --out paths) as one line with exit code 2 before the
model loads."""

import io
import json

import numpy as np
import pytest

from frontier_jax.cli import EXIT_INTERRUPTED, main
from frontier_jax.convert import from_hf
from frontier_jax.infer import Completion, Engine, SamplingParams
from frontier_jax.infer.generate_io import CompletionsFile
from frontier_jax.runtime.expert_ledger import read_expert_load
from tests.convert.helpers import TINY, tiny_hf_model

GENERATE_LIMITS = ["infer.max_len=32", "infer.block_size=8"]


def _prompts_file(tmp_path, prompts) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    tiny_hf_model(seed=2).save_pretrained(path)
    return path


def test_generate_writes_one_completion_per_prompt_and_exits_6_when_some_failed(hf_dir, tmp_path, capsys):
    """Prompts 0 and 2 complete as in an engine of their own; prompt 1 (an id outside the
    vocabulary) fails: exit 6, one `error:` line, and its line in --out says why.  --expert-stats
    holds the expert loads that an engine of their own counts."""
    vocab = TINY["vocab_size"]
    valid = [np.random.default_rng(i).integers(0, vocab, n).tolist() for i, n in enumerate((4, 9))]
    prompts = [valid[0], [vocab + 5], valid[1]]
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.npz"
    args = ["generate", "--hf", str(hf_dir), "--prompts", _prompts_file(tmp_path, prompts), "--out", str(out)]
    args += ["--expert-stats", str(stats)]
    assert main(args + ["--max-new-tokens", "6", *GENERATE_LIMITS, "impl.moe_dispatch=dropless"]) == 6
    err = capsys.readouterr().err
    assert "tok/s" in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: request 1: prompt token id {vocab + 5} at index 0 is outside [0, {vocab}) (model.vocab_size={vocab})"
    ]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["prompt_ids"] for r in rows] == prompts
    assert (
        rows[1]["finish_reason"] == "error" and rows[1]["output_ids"] == [] and "outside" in rows[1]["error"]
    )
    _, model = from_hf(str(hf_dir))
    engine = Engine(model)
    alone = engine.generate(valid, SamplingParams(max_new_tokens=6))
    assert [rows[0]["output_ids"], rows[2]["output_ids"]] == [c.output_ids for c in alone]
    dumped, counted = read_expert_load(stats), engine.expert_load()
    assert dumped.tokens == counted.tokens == 4 + 9 + 2 * 5  # prompts and the fed-back tokens
    np.testing.assert_array_equal(dumped.load, counted.load)
    assert all(rows[k]["finish_reason"] == "length" and len(rows[k]["logprobs"]) == 6 for k in (0, 2))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}"], "no checkpoint"),
        (["--hf", "{hf}", "--temperature", "-1"], "temperature=-1.0 must be >= 0"),
        (["--hf", "{hf}", "infer.max_seqs=0"], "infer.max_seqs=0 must be a positive integer"),
        (
            ["--hf", "{hf}", "train.steps=3"],
            "generate takes infer.key=value, impl.key=value and experts.key=value overrides only",
        ),
        (["--hf", "{hf}", "experts.window_steps=0"], "experts.window_steps=0 must be an integer >= 1"),
        (
            ["--checkpoint", "{tmp}", "--expert-stats", "{tmp}/stats.csv"],
            "stats.csv: expert stats files end in .npz or .json, not '.csv'",
        ),
        (
            ["--hf", "{hf}", "impl.moe_dispatch=sometimes"],
            "invalid override impl.moe_dispatch: Invalid value",
        ),
        (["--checkpoint", "{tmp}", "--seed", "-1"], "seed=-1 must be an integer in [0, 2^32)"),
        (["--checkpoint", "{tmp}", "--dtype", "float8"], "--dtype float8: use one of float32, bfloat16"),
    ],
    ids=[
        "empty_run_dir",
        "temperature",
        "max_seqs",
        "not_infer",
        "window",
        "stats_suffix",
        "bad_impl",
        "seed",
        "dtype",
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(hf_dir, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, hf=hf_dir) for a in args]
    assert main(["generate", *args, "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def _completion(k: int) -> Completion:
    return Completion([k], [k + 1], None, [-0.5], "length")


def test_completions_are_written_in_prompt_order_as_soon_as_the_earlier_ones_are_done():
    file = io.StringIO()
    writer = CompletionsFile(file)
    lines = []
    for index in (2, 0, 3, 1):
        writer.add(index, _completion(index))
        lines.append([json.loads(line)["index"] for line in file.getvalue().splitlines()])
    assert lines == [[], [0], [0], [0, 1, 2, 3]]
    assert json.loads(file.getvalue().splitlines()[3]) == {
        "index": 3,
        "prompt_ids": [3],
        "output_ids": [4],
        "text": None,
        "logprobs": [-0.5],
        "finish_reason": "length",
        "error": None,
    }


def test_an_interrupted_run_keeps_the_completions_it_made(hf_dir, tmp_path, monkeypatch):
    """One decode slot (infer.max_seqs=1): prompts finish one after another; Ctrl-C arrives in the
    step after the first one finished."""
    prompts = [[1, 2, 3], [4, 5], [6]]
    out = tmp_path / "out.jsonl"
    step, finished = Engine.step, []

    def interrupted_step(self):
        if finished:
            raise KeyboardInterrupt
        finished.extend(step(self))
        return finished

    monkeypatch.setattr(Engine, "step", interrupted_step)
    args = ["generate", "--hf", str(hf_dir), "--prompts", _prompts_file(tmp_path, prompts), "--out", str(out)]
    assert main(args + ["--max-new-tokens", "2", "infer.max_seqs=1", *GENERATE_LIMITS]) == EXIT_INTERRUPTED
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0]
    assert rows[0]["prompt_ids"] == prompts[0] and rows[0]["finish_reason"] == "length"
    assert len(rows[0]["output_ids"]) == len(rows[0]["logprobs"]) == 2


@pytest.mark.parametrize(
    "lines,message",
    [
        (b'{"prompt": 5}\n', 'prompts.jsonl:1: "prompt" = 5 must be a string'),
        (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', "prompts.jsonl:2: not UTF-8 (byte 0xff at column 13)"),
        (b'{"prompt": "a", "temperature": 1}\n', "prompts.jsonl:1: unknown key 'temperature'"),
        (b'{"prompt_ids": [1, 2.0]}\n', 'prompts.jsonl:1: "prompt_ids"[1] = 2.0 is not an integer token id'),
        (
            b'{"prompt_ids": [1, true]}\n',
            'prompts.jsonl:1: "prompt_ids"[1] = True is not an integer token id',
        ),
        (b'{"prompt_ids": 7}\n', 'prompts.jsonl:1: "prompt_ids" = 7 must be a list of integer token ids'),
        (b'["a"]\n', "prompts.jsonl:1: a line must be a JSON object, got list"),
    ],
    ids=["prompt_int", "not_utf8", "unknown_key", "float_id", "bool_id", "ids_not_list", "not_object"],
)
def test_bad_prompts_file_is_one_line_naming_file_line_and_key(tmp_path, capsys, lines, message):
    """Checked before the model loads: --checkpoint names an empty directory (no checkpoint)."""
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(lines)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompts", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path}/{message}"), err
    assert "\n" not in err


@pytest.mark.parametrize(
    "out,message",
    [
        (
            "{tmp}/missing/out.jsonl",
            "--out {tmp}/missing/out.jsonl: the directory {tmp}/missing does not exist",
        ),
        ("{tmp}", "--out {tmp} is a directory; give a file path"),
        (
            "{tmp}/prompts.jsonl/out.jsonl",
            "--out {tmp}/prompts.jsonl/out.jsonl: {tmp}/prompts.jsonl is a file",
        ),
        ("/proc/version", "--out /proc/version cannot be written ("),  # read-only for every user, root too
    ],
    ids=["missing_directory", "directory", "parent_is_a_file", "read_only"],
)
def test_unwritable_out_is_refused_before_the_model_loads(tmp_path, capsys, out, message):
    prompts = _prompts_file(tmp_path, [[1, 2]])
    args = ["generate", "--checkpoint", str(tmp_path / "no_run"), "--prompts", prompts]
    assert main(args + ["--out", out.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + message.format(tmp=tmp_path)) and "\n" not in err, err
