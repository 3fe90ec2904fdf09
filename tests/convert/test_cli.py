"""`frontier-jax convert check|export`."""

import os

from frontier_jax.convert.cli import main
from frontier_jax.convert.safetensors_io import INDEX_FILE


def test_check_prints_the_config_and_a_finite_forward(saved_tiny, capsys):
    assert main(["check", "--hf", saved_tiny[0], "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "kv_lora_rank: 16" in out and "parameters:" in out
    assert "logits (1, 4, 64)" in out and "finite=True" in out


def test_export_writes_a_sharded_checkpoint(saved_tiny, tmp_path):
    out = str(tmp_path / "out")
    assert main(["export", "--hf", saved_tiny[0], "--out", out, "--max-shard-mb", "0.05"]) == 0
    assert os.path.exists(os.path.join(out, "config.json")) and os.path.exists(os.path.join(out, INDEX_FILE))
