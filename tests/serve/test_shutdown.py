"""SIGTERM drains: the server (in its own process) stops admitting requests, lets a running
stream finish within serve.drain_timeout_s and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import portpicker
import requests

from tests.serve.common import TIMEOUT, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_lets_the_running_stream_finish_and_exits_0():
    port = portpicker.pick_unused_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.serve.common", "--port", str(port), "--drain-timeout-s", "150"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        body = {"prompt": "x", "max_tokens": 30, "temperature": 0, "stream": True, "ignore_eos": True}
        # compiled once beforehand, so that the drain is about serving, not compiling
        requests.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=TIMEOUT)
        stream = requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=TIMEOUT)
        events = stream.iter_lines()
        first = next(e for e in events if e.startswith(b"data:"))
        process.send_signal(signal.SIGTERM)
        try:
            rest = [e for e in events if e.startswith(b"data:")]
        except requests.RequestException as err:
            process.kill()
            raise AssertionError(
                f"the stream was cut: {err}; server: {process.communicate()[1][-2000:]}"
            ) from err
        chunks = [json.loads(e[5:]) for e in [first, *rest[:-1]]]
        assert rest[-1] == b"data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        try:  # a new request during or after the drain: refused, never served
            late = requests.post(f"{url}/v1/completions", json={"prompt": "y"}, timeout=TIMEOUT)
            assert late.status_code == 503
        except requests.ConnectionError:
            pass
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, stderr
        assert "server stopped" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
