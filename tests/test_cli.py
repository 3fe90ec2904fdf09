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
