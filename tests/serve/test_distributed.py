"""`frontier-jax serve --distributed` on 2 local processes x 4 fake CPU devices (one mesh of 8:
data 2, expert 2, tensor 2): process 0 serves HTTP and broadcasts each step's submissions and
cancellations, process 1 runs the same steps.

Reference: `Engine.generate` of the same checkpoint (an exported Hugging Face directory of the
tiny serving model, fp32) on one device in this process.  Outputs are equal, or the first
difference falls on a step whose top-2 log-prob gap is below 1e-5 (another layout and other
batch mates move logits by rounding).  Every client call and every wait has a timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import portpicker
import pytest
import requests

from frontier_jax.convert.exporter import to_hf
from frontier_jax.infer import Engine, SamplingParams
from tests.serve import common
from tests.serve.common import INFER, TIMEOUT, TOKENIZER, metric

ROOT = Path(__file__).resolve().parents[2]
GAP_TOL = 1e-5
EXIT_TIMEOUT = 120.0  # seconds for both processes to exit after SIGTERM (a bound on a loaded CI machine)
MESH = ["mesh.data=2", "mesh.expert=2", "mesh.tensor=2"]
CANCELLED = 'frontier_jax:request_success_total{finished_reason="cancelled"}'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny serving model as a Hugging Face directory with its tokenizer, and a one-device
    engine over it (the reference)."""
    path = tmp_path_factory.mktemp("serve_distributed") / "tiny"
    program, params, biases = common.program_and_params()
    to_hf(program.model(params, biases), str(path))
    (path / "tokenizer.json").write_text(TOKENIZER.to_str())
    return path, Engine.from_hf(str(path), infer=INFER)


class Processes:
    """`frontier-jax serve --distributed` as 2 local processes of 4 CPU devices each."""

    def __init__(self, hf_dir: Path, logs: Path, *overrides: str):
        self.port = portpicker.pick_unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        coordinator = portpicker.pick_unused_port()
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        infer = [
            f"infer.{k}={getattr(INFER, k)}" for k in ("block_size", "max_seqs", "max_len", "prefill_chunk")
        ]
        self.logs = [logs / f"process_{i}.log" for i in range(2)]
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "frontier_jax",
                    "serve",
                    "--distributed",
                    "--hf",
                    str(hf_dir),
                    "--port",
                    str(self.port),
                    "--served-model-name",
                    common.MODEL_NAME,
                    *MESH,
                    *infer,
                    *overrides,
                ],
                cwd=ROOT,
                env={
                    **os.environ,
                    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{coordinator}",
                    "JAX_NUM_PROCESSES": "2",
                    "JAX_PROCESS_ID": str(i),
                    "JAX_PLATFORMS": "cpu",
                    "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "XLA_FLAGS": " ".join(flags + ["--xla_force_host_platform_device_count=4"]),
                },
                stdout=subprocess.DEVNULL,
                stderr=self.logs[i].open("w"),
            )
            for i in range(2)
        ]

    def __enter__(self) -> Processes:
        """Once process 0 answers /health; a process that exits first fails the test with its log."""
        deadline = time.monotonic() + TIMEOUT
        try:
            while True:
                exited = [(i, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]
                assert not exited, (
                    f"process {exited[0][0]} exited ({exited[0][1]}): {self.logs[exited[0][0]].read_text()[-2000:]}"
                )
                try:
                    if requests.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, f"no server at {self.url} after {TIMEOUT} s"
                time.sleep(0.2)
        except BaseException:
            self.__exit__()
            raise

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)

    def wait(self, timeout: float) -> list[tuple[int, str]]:
        """(exit code, stderr) of each process once both have exited within `timeout` seconds."""
        codes = [p.wait(timeout=timeout) for p in self.procs]
        return [(code, log.read_text()) for code, log in zip(codes, self.logs)]

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[TOKENIZER.bos_id] + rng.integers(32, 127, n - 1).tolist() for n in lengths]


def greedy(client: openai.OpenAI, ids: list[int], max_tokens: int):
    return client.completions.create(
        model=common.MODEL_NAME,
        prompt=ids,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    ).choices[0]


def assert_matches(choice, reference, what: str) -> None:
    """The choice's tokens equal the reference's, or the first difference is a near tie."""
    tokens = [TOKENIZER.decode([t]) for t in reference.output_ids]
    if choice.logprobs.tokens != tokens:
        k = next(k for k, (a, b) in enumerate(zip(choice.logprobs.tokens, tokens)) if a != b)
        top = sorted(choice.logprobs.top_logprobs[k].values(), reverse=True)
        assert top[0] - top[1] < GAP_TOL, f"{what} differs at token {k} with a top-2 gap {top[0] - top[1]}"


def cancellations(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=TIMEOUT).text
    return float(text.split(CANCELLED)[1].split()[0]) if CANCELLED in text else 0.0


def wait_for(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.2)


def stream_and_disconnect(url: str, ids: list[int]) -> None:
    """A streamed completion whose client goes away after its first token."""
    body = {"prompt": ids, "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=TIMEOUT) as stream:
        next(e for e in stream.iter_lines() if e.startswith(b"data:"))


def test_two_processes_serve_the_one_process_outputs_and_stop_on_sigterm(checkpoint, tmp_path):
    hf_dir, engine = checkpoint
    ids = prompts([12, 15, 10, 13], seed=3)  # one prefill width (16): few programs to compile
    budget = 6
    with Processes(hf_dir, tmp_path, "serve.follower_timeout_s=150") as served:
        client = served.client()
        with ThreadPoolExecutor(2) as pool:  # two at once: they share decode steps
            together = list(pool.map(lambda p: greedy(client, p, budget), ids[:2]))
        stream_and_disconnect(served.url, ids[2])
        wait_for(lambda: cancellations(served.url) == 1, "the disconnected stream to be cancelled")
        after = greedy(client, ids[3], budget)  # the cancellation was applied on both processes
        served.procs[0].send_signal(signal.SIGTERM)
        (code0, err0), (code1, err1) = served.wait(EXIT_TIMEOUT)
    assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
    assert "server stopped" in err0 and "stopped with process 0" in err1
    for k, choice in ((0, together[0]), (1, together[1]), (3, after)):
        solo = engine.generate([ids[k]], SamplingParams(max_new_tokens=budget, ignore_eos=True))[0]
        assert_matches(choice, solo, f"prompt {k}")


@pytest.mark.slow
def test_two_processes_serve_many_requests_samples_and_prefix_hits(checkpoint, tmp_path):
    """Eight concurrent requests of different lengths, n = 2 seeded samples, shared prefixes
    (prefix-cache hits on both processes), then a follower that dies: process 0 stops with one
    error line (exit 8)."""
    hf_dir, engine = checkpoint
    lengths = [17 + (7 * i) % 16 for i in range(8)]
    budgets = [4 + (5 * i) % 9 for i in range(8)]
    ids = prompts(lengths, seed=5)
    shared = prompts([40], seed=9)[0]
    with Processes(hf_dir, tmp_path, "serve.follower_timeout_s=150") as served:
        client = served.client()
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda i: greedy(client, ids[i], budgets[i]), range(8)))
        for i, choice in enumerate(together):
            solo = engine.generate([ids[i]], SamplingParams(max_new_tokens=budgets[i], ignore_eos=True))[0]
            assert_matches(choice, solo, f"request {i}")

        sampled = client.completions.create(
            model=common.MODEL_NAME, prompt=ids[0], max_tokens=6, temperature=1.0, n=2, seed=11
        )
        for j, choice in enumerate(sampled.choices):
            want = engine.generate([ids[0]], SamplingParams(max_new_tokens=6, temperature=1.0, seed=11 + j))[
                0
            ]
            assert choice.text == want.text, j

        first = greedy(client, shared + [65], 5)
        second = greedy(client, shared + [66], 5)
        hits = metric(
            requests.get(f"{served.url}/metrics", timeout=TIMEOUT).text,
            "frontier_jax:prefix_cache_hits_total",
        )
        assert hits > 0
        for extra, choice in ((65, first), (66, second)):
            solo = engine.generate([shared + [extra]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
            assert_matches(choice, solo, f"shared prefix + {extra}")

        served.procs[1].kill()
        (code0, err0), _ = served.wait(EXIT_TIMEOUT)
    assert code0 == 8, err0[-2000:]
    errors = [line for line in err0.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "follower" in errors[0], err0[-2000:]
