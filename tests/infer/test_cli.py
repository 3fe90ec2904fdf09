"""`frontier-jax generate`: JSONL in and out with an imported model, and user errors as one line."""

import json

import numpy as np
import pytest

from frontier_jax.cli import main
from frontier_jax.convert import from_hf
from frontier_jax.infer import Engine, SamplingParams
from tests.convert.helpers import TINY, tiny_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    tiny_hf_model(seed=2).save_pretrained(path)
    return path


def test_generate_writes_one_completion_per_prompt(hf_dir, tmp_path, capsys):
    prompts = [
        np.random.default_rng(i).integers(0, TINY["vocab_size"], n).tolist() for i, n in enumerate((4, 9))
    ]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "generate",
                "--hf",
                str(hf_dir),
                "--prompts",
                str(source),
                "--max-new-tokens",
                "6",
                "--out",
                str(out),
                "infer.max_len=32",
                "infer.block_size=8",
                "impl.moe_dispatch=dropless",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    _, model = from_hf(str(hf_dir))
    alone = Engine(model).generate(prompts, SamplingParams(max_new_tokens=6))
    assert [r["prompt_ids"] for r in rows] == prompts
    assert [r["output_ids"] for r in rows] == [c.output_ids for c in alone]
    assert all(r["finish_reason"] == "length" and len(r["logprobs"]) == 6 for r in rows)
    assert "tok/s" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}"], "no checkpoint"),
        (["--hf", "{hf}", "--temperature", "-1"], "temperature=-1.0 must be >= 0"),
        (["--hf", "{hf}", "infer.max_seqs=0"], "infer.max_seqs=0 must be a positive integer"),
        (
            ["--hf", "{hf}", "train.steps=3"],
            "generate takes infer.key=value and impl.key=value overrides only",
        ),
        (
            ["--hf", "{hf}", "impl.moe_dispatch=sometimes"],
            "invalid override impl.moe_dispatch: Invalid value",
        ),
    ],
    ids=["empty_run_dir", "temperature", "max_seqs", "not_infer", "bad_impl"],
)
def test_user_errors_are_one_line_with_exit_code_2(hf_dir, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, hf=hf_dir) for a in args]
    assert main(["generate", *args, "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
