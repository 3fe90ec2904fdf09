"""`frontier-jax convert check|export`."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from frontier_jax import cli
from frontier_jax.convert.cli import main
from frontier_jax.convert.safetensors_io import INDEX_FILE, SINGLE_FILE
from tests.train.common import REPO, subprocess_env


def test_check_prints_the_config_and_a_finite_forward(saved_tiny, capsys):
    assert main(["check", "--hf", saved_tiny[0], "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "kv_lora_rank: 16" in out and "parameters:" in out
    assert "logits (1, 4, 64)" in out and "finite=True" in out


def test_export_writes_a_sharded_checkpoint(saved_tiny, tmp_path):
    out = str(tmp_path / "out")
    assert main(["export", "--hf", saved_tiny[0], "--out", out, "--max-shard-mb", "0.05"]) == 0
    assert os.path.exists(os.path.join(out, "config.json")) and os.path.exists(os.path.join(out, INDEX_FILE))


def _copy_of(saved_tiny, tmp_path, name="ckpt"):
    path = tmp_path / name
    shutil.copytree(saved_tiny[0], path)
    return path


def _break_config(path):
    (path / "config.json").write_text("{oops")


def _wrong_model_type(path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _truncate(size):
    def cut(path):
        with open(path / SINGLE_FILE, "r+b") as f:
            f.truncate(size)

    return cut


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: shutil.rmtree(p), r"HF checkpoint directory {path} does not exist"),
        (lambda p: (p / "config.json").unlink(), r"HF checkpoint directory {path} has no config\.json"),
        (_break_config, r"{path}/config\.json: the model config is not valid JSON"),
        (_wrong_model_type, r"{path}/config\.json: HF config model_type='llama' is not supported"),
        (lambda p: (p / SINGLE_FILE).unlink(), r"{path} has neither model\.safetensors\.index\.json nor"),
        (_truncate(100), r"{path}/model\.safetensors: truncated safetensors file \(100 bytes"),
        (
            _truncate(20_000),
            r"{path}/model\.safetensors: truncated safetensors file: tensor \S+ ends at byte",
        ),
    ],
)
def test_every_bad_checkpoint_is_one_error_line_naming_the_file(
    saved_tiny, tmp_path, capsys, damage, message
):
    path = _copy_of(saved_tiny, tmp_path)
    damage(path)
    for command in ("check", "export"):
        extra = ["--out", str(tmp_path / "out")] if command == "export" else []
        assert cli.main(["convert", command, "--hf", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(r"error: " + message.format(path=re.escape(str(path))) + r".*\n", err), err


def test_check_with_no_tokens_is_an_error(saved_tiny, capsys):
    assert cli.main(["convert", "check", "--hf", saved_tiny[0], "--tokens", "0"]) == 2
    assert capsys.readouterr().err == "error: convert check --tokens 0: must be > 0\n"


def test_a_missing_path_from_the_command_line_prints_no_traceback(tmp_path):
    """As a user runs it: one line on stderr, exit code 2 (it used to bypass the error handler)."""
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [sys.executable, "-m", "frontier_jax", "convert", "check", "--hf", str(missing)],
        env=subprocess_env(devices=None),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: HF checkpoint directory {missing} does not exist\n"
