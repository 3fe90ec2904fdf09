"""`frontier-jax eval` on a training checkpoint: results.json and the table, the same figures on
1 device, on an 8-device layout and on 2 processes x 4 devices, held-out figures logged during
training equal to the CLI's on the same checkpoint, and bad input as one error line (exit 2)
with no results file written.  The run is trained by `frontier-jax train --config train/toy`
(the README's command, on a tiny model for 2 steps), so train -> eval -> generate is the README's
chain on one checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from frontier_jax.cli import main

from .common import DOCUMENTS, TINY_MODEL

REPO = Path(__file__).resolve().parents[2]
WINDOW = ["eval.seq_len=16", "eval.stride=8", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny training run with held-out evaluation at step 2, and its data file."""
    root = tmp_path_factory.mktemp("eval_cli")
    data = root / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    overrides = (
        TINY_MODEL
        + WINDOW
        + [
            "train.seq_len=16",
            "train.global_batch=8",
            "train.steps=2",
            "train.warmup_steps=1",
            "checkpoint.every=0",
            "eval.every=2",
            "eval.max_documents=0",
            f"eval.data=[{{name: held_out, kind: jsonl, path: {data}}}]",
        ]
    )
    run_dir = root / "run"
    assert main(["train", "--config", "train/toy", "--run-dir", str(run_dir), *overrides]) == 0
    return root


def _eval(run, out, *extra):
    return main(
        [
            "eval",
            "--checkpoint",
            str(run / "run"),
            "--data",
            str(run / "held_out.jsonl"),
            "--out",
            str(out),
            *WINDOW,
            *extra,
        ]
    )


def _figures(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())["datasets"]["held_out"]


def test_eval_writes_results_and_table_with_exact_counts(run, tmp_path, capsys):
    assert _eval(run, tmp_path / "one", "mesh.data=1", "--devices", "1") == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "held_out" in printed
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["step"] == 2 and results["window"] == 16 and results["stride"] == 8
    got = results["datasets"]["held_out"]
    assert got["tokens"] == sum(len(d.encode()) + 1 for d in DOCUMENTS)  # text bytes + <eos>
    assert got["bytes"] == sum(len(d.encode()) for d in DOCUMENTS)
    np.testing.assert_allclose(got["bits_per_byte"], got["text_nll"] / got["bytes"] / np.log(2), rtol=1e-12)


def test_training_logs_the_held_out_figures_of_its_checkpoint(run, tmp_path):
    rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "eval/held_out/bits_per_byte" in r]
    assert [r["step"] for r in logged] == [2]
    assert _eval(run, tmp_path / "cli", "mesh.data=1", "--devices", "1") == 0
    np.testing.assert_allclose(
        logged[0]["eval/held_out/bits_per_byte"], _figures(tmp_path / "cli")["bits_per_byte"], rtol=1e-6
    )


def test_generate_from_the_evaluated_checkpoint(run, capsys):
    args = ["generate", "--checkpoint", str(run / "run"), "--prompt", "Q: 3 + 4 = ?", "--max-new-tokens", "5"]
    assert main(args + ["infer.max_len=32", "infer.block_size=8"]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("---") == 1 and "generated 5 tokens" in printed.out + printed.err


def test_generate_refuses_an_unknown_dtype_in_one_line(run, capsys):
    args = ["generate", "--checkpoint", str(run / "run"), "--prompt", "x", "--dtype", "float8"]
    assert main(args) == 2
    assert capsys.readouterr().err == "error: --dtype float8: use one of float32, bfloat16\n"


def test_overrides_after_data_apply_and_skipped_records_are_reported(run, tmp_path, capsys):
    """`--data FILE key=value ...` (the overrides no longer read as data files), and a file with
    3 unusable lines among the documents: the console names the count, the reasons and the
    first line; the figures count only the documents."""
    noisy = tmp_path / "noisy.jsonl"
    lines = [
        json.dumps({"text": DOCUMENTS[0]}),
        "{not json",
        json.dumps({"txt": "a"}),
        json.dumps({"text": " "}),
    ]
    noisy.write_text("\n".join(lines + [json.dumps({"text": d}) for d in DOCUMENTS[1:]]) + "\n")
    out = tmp_path / "out"
    argv = [
        "eval",
        "--checkpoint",
        str(run / "run"),
        "--out",
        str(out),
        "--devices",
        "1",
        "--data",
        str(noisy),
    ]
    assert main(argv + [*WINDOW, "mesh.data=1"]) == 0
    err = capsys.readouterr().err
    assert (
        f"eval source 'noisy' ({noisy}): 3 of 7 records skipped (invalid_json 1, missing_field 1, "
        f"empty_text 1; the first at {noisy}:2); the figures cover the other 4"
    ) in err
    results = json.loads((out / "results.json").read_text())
    assert (results["window"], results["stride"], results["batch_size"]) == (16, 8, 8)
    got = results["datasets"]["noisy"]
    assert got["skipped"] == 3 and got["tokens"] == sum(len(d.encode()) + 1 for d in DOCUMENTS)


@pytest.mark.slow
def test_same_figures_on_8_devices_and_on_2_processes(run, tmp_path):
    assert _eval(run, tmp_path / "one", "mesh.data=1", "--devices", "1", "--dtype", "float32") == 0
    want = _figures(tmp_path / "one")
    assert _eval(run, tmp_path / "eight", "mesh.data=2", "mesh.expert=2", "mesh.tensor=2") == 0
    got = _figures(tmp_path / "eight")
    np.testing.assert_allclose(got["nll"], want["nll"], rtol=1e-6)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            JAX_PLATFORMS="cpu",
            PYTHONPATH=str(REPO),
            XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"]),
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "frontier_jax",
                    "eval",
                    "--distributed",
                    "--checkpoint",
                    str(run / "run"),
                    "--data",
                    str(run / "held_out.jsonl"),
                    "--out",
                    str(tmp_path / "two"),
                    *WINDOW,
                    "mesh.data=2",
                    "mesh.expert=2",
                    "mesh.tensor=2",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    got = _figures(tmp_path / "two")
    assert got["tokens"] == want["tokens"]
    np.testing.assert_allclose(got["nll"], want["nll"], rtol=1e-6)


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("no checkpoint", ["--checkpoint", "{tmp}"], "no checkpoint in"),
        ("missing step", ["--checkpoint", "{run}", "--step", "7"], "no checkpoint of step 7"),
        (
            "model mismatch",
            ["--checkpoint", "{run}", "model.hidden_size=64"],
            "model.hidden_size=64 does not match",
        ),
        ("empty dataset", ["--checkpoint", "{run}", "--data", "{empty}"], "holds no document"),
        ("unknown file type", ["--checkpoint", "{run}", "--data", "{tmp}/x.txt"], "unknown file type"),
        ("train override", ["--checkpoint", "{run}", "train.steps=3"], "only mesh.*, eval.*"),
        (
            "impl override",
            ["--checkpoint", "{run}", "impl.moe_dispatch=sometimes"],
            "impl.moe_dispatch='sometimes' is invalid",
        ),
        ("both sources", ["--checkpoint", "{run}", "--hf", "{tmp}"], "exactly one of"),
        (
            "window above the model's context",
            ["--checkpoint", "{run}", "eval.seq_len=5000"],
            "eval.seq_len=5000 exceeds the model's context, model.max_position_embeddings=4096",
        ),
        (
            "bad task row, before the model loads",
            ["--checkpoint", "{tmp}", "--tasks", "{task}"],
            "rows.jsonl:1: field 'answer' = 5 is not an index of the row's 2 choices",
        ),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(run, tmp_path, capsys, case, args, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    (tmp_path / "rows.jsonl").write_text('{"q": "1 + 1", "choices": [" 2", " 3"], "answer": 5}\n')
    task = tmp_path / "task.yaml"
    task.write_text("type: multiple_choice\ndata: rows.jsonl\nprompt: '{q} ='\n")
    args = [a.format(tmp=tmp_path, run=run / "run", empty=empty, task=task) for a in args]
    options, overrides = [a for a in args if "=" not in a], [a for a in args if "=" in a]
    assert (
        main(
            [
                "eval",
                *options,
                "--out",
                str(tmp_path / "out"),
                "--devices",
                "1",
                *WINDOW,
                "mesh.data=1",
                *overrides,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
