"""The `frontier-jax` command line (frontier_jax/cli.py): argument checks and one-line errors."""

from __future__ import annotations

import pytest

from frontier_jax import cli


@pytest.mark.parametrize(
    "flag, value",
    [("--seq-len", "-5"), ("--seq-len", "0"), ("--devices", "0"), ("--device-memory-gib", "-1")],
)
def test_describe_rejects_a_nonpositive_size(capsys, flag, value):
    assert cli.main(["describe", "--config", "model/toy", flag, value]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: describe {flag} {value}") and err.endswith(": must be > 0\n")
    assert err.count("\n") == 1
    assert out == ""


def test_checkpoint_verify_of_a_directory_without_checkpoints_is_one_error_line(tmp_path, capsys):
    assert cli.main(["checkpoint", "verify", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert err == (
        f"error: no checkpoint in {tmp_path}: expected a run directory holding checkpoints/<step>/, "
        "its checkpoints/ directory or one checkpoints/<step>/ directory\n"
    )
    assert out == ""
