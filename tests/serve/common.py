"""The tiny served model shared by the server tests: the evaluation tests' tiny MoE model (fp32)
on a one-device program, an engine over it and a server running in a background thread on a
free loopback port.  `python -m tests.serve.common --port N` runs the same server in its own
process (the SIGTERM test)."""

from __future__ import annotations

import argparse
import threading
import time

import jax
import requests
import uvicorn

from frontier_jax.config import load_config
from frontier_jax.data.tokenizer import byte_tokenizer
from frontier_jax.infer import Engine, InferConfig
from frontier_jax.runtime.program import build_model_program
from frontier_jax.serve import ServeConfig
from frontier_jax.serve.app import Server, create_app
from frontier_jax.serve.cli import bind, run_server
from tests.eval.common import TINY_MODEL

INFER = InferConfig(block_size=16, max_seqs=4, max_len=64, prefill_chunk=32)
TOKENIZER = byte_tokenizer()
MODEL_NAME = "tiny"
TIMEOUT = 180.0  # seconds, every client call (a bound on a loaded 2-core machine, not the expected time)


def program_and_params():
    program = build_model_program(
        load_config("model/toy", TINY_MODEL + ["model.mtp_depth=0"]), jax.devices()[:1]
    )
    params, biases = program.init(7)
    return program, params, biases


def make_engine(model) -> Engine:
    """An engine over `model` = (program, params, biases)."""
    return Engine.from_program(*model, tokenizer=TOKENIZER, infer=INFER)


def make_server(model, config: ServeConfig | None = None, **kwargs) -> Server:
    config = config or ServeConfig(max_waiting=64, drain_timeout_s=20.0)
    return Server(make_engine(model), config, model_name=MODEL_NAME, **kwargs)


class Background:
    """`server` served by uvicorn in a thread of this process (no signal handling)."""

    def __init__(self, server: Server):
        self.server = server
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(server), log_level="warning", access_log=False)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Background:
        self.thread.start()
        wait_healthy(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


def wait_healthy(url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no server at {url} after {timeout} s")


def metric(text: str, name: str) -> float:
    """The value of the unlabelled sample `name` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--drain-timeout-s", type=float, default=20.0)
    args = parser.parse_args()
    server = make_server(
        program_and_params(), ServeConfig(max_waiting=64, drain_timeout_s=args.drain_timeout_s)
    )
    raise SystemExit(run_server(server, bind("127.0.0.1", args.port)))
