"""`frontier-jax serve` refuses what it cannot run before any model work: a port in use and bad
serve.* overrides are one `error:` line with exit 2."""

from __future__ import annotations

import socket

import pytest

from frontier_jax.cli import main
from frontier_jax.serve.cli import serve_config


def test_a_port_in_use_is_one_error_line_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # the run directory does not exist: the address is checked first
        code = main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in err[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("serve.max_waiting=-1", "serve.max_waiting=-1 must be an integer >= 0"),
        ("serve.drain_timeout_s=-2", "serve.drain_timeout_s=-2.0 must be >= 0"),
        ("serve.nope=1", "nope"),
    ],
)
def test_bad_serve_overrides_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        serve_config([override])
    assert serve_config(["serve.max_waiting=3"]).max_waiting == 3
