"""The OpenAI-compatible server against the real `openai` client and raw HTTP, on one tiny fp32
model served in a background thread (one module-scoped server).

References: `Engine.generate` on a second engine over the same parameters (greedy and seeded
outputs), the evaluation `Scorer` (echo + logprobs: tolerance 1e-4 nats per token, chunked paged
prefill against one full forward), non-streamed responses (streamed chunks joined), separate
requests with seed + j (n samples), solo runs (concurrent requests: equal, or the first
difference falls on a step whose top-2 log-prob gap is below 1e-5)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests

from frontier_jax.eval.scorer import Scorer
from frontier_jax.eval.windows import Window
from frontier_jax.infer import SamplingParams
from tests.serve import common
from tests.serve.common import MODEL_NAME, TIMEOUT, TOKENIZER

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCORER_TOL = 1e-4
GAP_TOL = 1e-5


@pytest.fixture(scope="module")
def served():
    model = common.program_and_params()
    with common.Background(common.make_server(model, api_key=KEY)) as background:
        client = openai.OpenAI(base_url=f"{background.url}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)
        yield background, client, model, common.make_engine(model)


def bos(text: str) -> list[int]:
    return [TOKENIZER.bos_id] + TOKENIZER.encode(text)


def prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[TOKENIZER.bos_id] + rng.integers(32, 127, n - 1).tolist() for n in lengths]


def post(url: str, path: str, body, headers=AUTH, **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(url + path, data=data, headers=headers, **{"timeout": TIMEOUT, **kwargs})


def metrics(url: str) -> str:
    return requests.get(url + "/metrics", headers=AUTH, timeout=TIMEOUT).text


def test_greedy_completions_equal_engine_generate(served):
    background, client, _, engine = served
    ids = prompts([5, 13, 9])
    got = client.completions.create(model=MODEL_NAME, prompt=ids + [], max_tokens=10, temperature=0)
    text = client.completions.create(model=MODEL_NAME, prompt="def f(x):", max_tokens=10, temperature=0)
    expected = engine.generate(ids + [bos("def f(x):")], SamplingParams(max_new_tokens=10))
    assert [c.text for c in got.choices] + [text.choices[0].text] == [e.text for e in expected]
    assert [c.finish_reason for c in got.choices] == [e.finish_reason for e in expected[:3]]
    assert got.usage.prompt_tokens == 27 and got.usage.completion_tokens == sum(
        len(e.output_ids) for e in expected[:3]
    )
    tokenized = post(background.url, "/tokenize", {"prompt": "def f(x):"}).json()
    assert tokenized["tokens"] == bos("def f(x):")
    assert post(background.url, "/tokenize", {"prompt": "a", "add_special_tokens": False}).json()[
        "tokens"
    ] == [97]
    assert post(background.url, "/detokenize", {"tokens": [104, 105]}).json() == {"prompt": "hi"}


def test_streamed_chunks_join_to_the_text_and_usage_comes_last(served):
    _, client, _, _ = served
    args = dict(model=MODEL_NAME, prompt="Once", max_tokens=12, temperature=1.0, seed=7)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0.8, seed=3
    )
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0.8, seed=3, stream=True
    )
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content
    prompt = post(served[0].url, "/tokenize", {"messages": messages}).json()["tokens"]
    assert chat.usage.prompt_tokens == len(prompt) and prompt[-1] == TOKENIZER.special_id("assistant")


def test_n_samples_equal_separate_requests_with_seed_plus_j(served):
    _, client, _, _ = served
    args = dict(model=MODEL_NAME, prompt="The", max_tokens=6, temperature=1.0)
    together = client.completions.create(**args, n=3, seed=11)
    alone = [client.completions.create(**args, seed=11 + j).choices[0].text for j in range(3)]
    assert [c.text for c in together.choices] == alone
    assert len(set(alone)) > 1  # the seeds differ
    assert client.completions.create(**args, seed=11).choices[0].text == alone[0]  # a seed repeats


def test_stop_string_ends_the_text_before_it(served):
    _, client, _, engine = served
    full = engine.generate([bos("abc")], SamplingParams(max_new_tokens=16, ignore_eos=True))[0].text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].isprintable())
    got = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"


def test_echo_logprobs_equal_the_scorer_as_lm_eval_reads_them(served):
    _, client, (program, params, biases), _ = served
    context, continuation = prompts([11])[0], [101, 102, 40, 41]
    ids = context + continuation
    got = client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    lp = got.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    scorer = Scorer(program, params, biases, context=32, batch_size=1, progress=False)
    window = Window(
        np.asarray(ids[:-1], np.int32), np.asarray(ids[1:], np.int32), np.ones(len(ids) - 1, np.int32), 0
    )
    ((reference, greedy),) = scorer.score([window])
    np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], reference, atol=SCORER_TOL)
    ctxlen = len(context)  # lm-eval's local-completions: sum(token_logprobs[ctxlen:-1])
    assert sum(lp.token_logprobs[ctxlen:-1]) == pytest.approx(
        float(reference[ctxlen - 1 :].sum()), abs=4 * SCORER_TOL
    )
    is_greedy = [
        tok == max(top.values()) for tok, top in zip(lp.token_logprobs[1 : len(ids)], lp.top_logprobs[1:])
    ]
    assert is_greedy == greedy.tolist()
    assert got.choices[0].text.startswith(TOKENIZER.decode(ids))


def test_concurrent_requests_equal_their_solo_outputs(served):
    _, client, _, engine = served
    lengths = [17 + (7 * i) % 16 for i in range(32)]  # 17 .. 32: one prefill chunk width, few programs
    budgets = [4 + (5 * i) % 9 for i in range(32)]
    ids = prompts(lengths, seed=5)

    def one(i):
        return client.completions.create(
            model=MODEL_NAME,
            prompt=ids[i],
            max_tokens=budgets[i],
            temperature=0,
            logprobs=2,
            extra_body={"ignore_eos": True},
        ).choices[0]

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(one, range(32)))
    for i, choice in enumerate(together):
        solo = engine.generate([ids[i]], SamplingParams(max_new_tokens=budgets[i], ignore_eos=True))[0]
        tokens = [TOKENIZER.decode([t]) for t in solo.output_ids]
        if choice.logprobs.tokens != tokens:
            k = next(k for k, (a, b) in enumerate(zip(choice.logprobs.tokens, tokens)) if a != b)
            top = sorted(choice.logprobs.top_logprobs[k].values(), reverse=True)
            assert top[0] - top[1] < GAP_TOL, (
                f"request {i} differs at token {k} with a top-2 gap {top[0] - top[1]}"
            )


def test_client_disconnect_cancels_and_frees_its_slot(served):
    """Two clients go away (one streaming, one waiting for a whole response) while the engine
    thread is held between steps, so neither can finish first: both are cancelled before the
    next step, their slots and blocks freed, and the server serves the next request."""
    background, client, _, _ = served
    url, loop = background.url, background.server.loop
    cancelled = 'frontier_jax:request_success_total{finished_reason="cancelled"}'

    def cancellations() -> float:
        text = metrics(url)
        return float(text.split(cancelled)[1].split()[0]) if cancelled in text else 0.0

    before = cancellations()
    body = {"prompt": "x", "max_tokens": 50, "ignore_eos": True, "temperature": 0}
    stream = post(url, "/v1/completions", {**body, "stream": True}, stream=True)
    next(line for line in stream.iter_lines() if line.startswith(b"data:"))
    gate = threading.Event()
    held = loop.post(lambda engine: gate.wait(TIMEOUT))  # the engine thread waits here
    try:
        with pytest.raises(requests.Timeout):  # a non-streaming client that gives up
            post(url, "/v1/completions", body, timeout=1.5)
        stream.close()
        time.sleep(2.0)  # the server notices both disconnects (it polls every 0.25 s)
    finally:
        gate.set()
    held.result(TIMEOUT)
    other = client.completions.create(model=MODEL_NAME, prompt="y", max_tokens=5, temperature=0)
    assert other.choices[0].finish_reason == "length"
    text = metrics(url)
    assert cancellations() == before + 2
    assert common.metric(text, "frontier_jax:num_requests_running") == 0
    assert common.metric(text, "frontier_jax:kv_cache_usage_perc") == 0.0


INVALID = [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "frobnicate": 1, "zap": 2}, 400, "frobnicate"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x" * 80}, 400, "prompt"),
    ({"prompt": [[1, 2], [300]]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
    (b'{"prompt": "x",', 400, None),
]


@pytest.mark.parametrize(
    "body, status, param", INVALID, ids=lambda v: str(v)[:30] if not isinstance(v, int) else None
)
def test_invalid_request_is_answered_and_the_server_keeps_serving(served, body, status, param):
    url = served[0].url
    answer = post(url, "/v1/completions", body)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["param"] == param and error["code"] == status and error["message"]
    if param == "frobnicate":
        assert "frobnicate" in error["message"] and "zap" in error["message"]
    assert post(url, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_auth_full_queue_and_endpoints(served):
    background, _, _, _ = served
    url = background.url
    wrong = post(url, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert requests.get(url + "/health", timeout=TIMEOUT).status_code == 200  # no key needed
    server = background.server
    limit, server.config.max_waiting = server.config.max_waiting, 0
    try:
        full = post(url, "/v1/completions", {"prompt": "x"})
    finally:
        server.config.max_waiting = limit
    assert full.status_code == 503 and full.headers["Retry-After"] == "1"
    card = requests.get(url + "/v1/models", headers=AUTH, timeout=TIMEOUT).json()["data"][0]
    assert card["id"] == MODEL_NAME and card["max_model_len"] == common.INFER.max_len
    info = requests.get(url + "/tokenizer_info", headers=AUTH, timeout=TIMEOUT).json()
    assert info["eos_token"] == "<eos>" and info["bos_token"] == "<bos>"
    text = metrics(url)
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert common.metric(text, f"frontier_jax:{name}_count") > 0
    assert common.metric(text, "frontier_jax:generation_tokens_total") > 0
    assert 'frontier_jax:expert_load_max{layer="0"}' in text


def test_shared_prefix_is_served_from_the_prefix_cache_with_the_same_output(served):
    """Two prompts sharing 40 tokens (two full 16-token blocks): the second prefills only past
    them (usage.prompt_tokens_details.cached_tokens = 32, /metrics hits up by 32) and its greedy
    output equals a separate engine's."""
    background, client, _, engine = served
    shared = prompts([41], seed=77)[0]
    rng = np.random.default_rng(78)
    first, second = (shared + rng.integers(32, 127, 4).tolist() for _ in range(2))
    hits = common.metric(metrics(background.url), "frontier_jax:prefix_cache_hits_total")
    answers = [
        client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=8, temperature=0)
        for p in (first, second)
    ]
    assert [a.usage.prompt_tokens_details.cached_tokens for a in answers] == [0, 32]
    after = common.metric(metrics(background.url), "frontier_jax:prefix_cache_hits_total")
    assert after - hits == 32
    expected = engine.generate([first, second], SamplingParams(max_new_tokens=8))
    assert [a.choices[0].text for a in answers] == [e.text for e in expected]


def test_expert_stats_dump_returns_and_writes_the_engines_ledger(served, tmp_path):
    """POST /expert_stats/dump: the window of the engine's expert-load ledger (each of its
    steps' counts summed: the per-layer tokens routed over its experts are top-k times the
    positions counted), the same array written to a .npz that `experts plan` reads; a path
    the server cannot write is a 400 naming `path`."""
    from frontier_jax.runtime.expert_ledger import read_expert_load

    background, client, model, _ = served
    client.completions.create(model=MODEL_NAME, prompt=prompts([9], seed=5)[0], max_tokens=4, temperature=0)
    path = tmp_path / "load.npz"
    dumped = post(background.url, "/expert_stats/dump", {"path": str(path)}).json()
    load = np.asarray(dumped["load"])
    cfg = background.server.engine.cfg
    assert load.shape == (cfg.num_moe_layers, cfg.n_routed_experts) == (dumped["layers"], dumped["experts"])
    assert dumped["tokens"] > 0
    np.testing.assert_array_equal(load.sum(-1), dumped["tokens"] * cfg.num_experts_per_tok)
    saved = read_expert_load(path)
    np.testing.assert_array_equal(saved.load, load)
    assert saved.tokens == dumped["tokens"]
    bad = post(background.url, "/expert_stats/dump", {"path": str(tmp_path / "missing" / "x.npz")})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "path"
    assert post(background.url, "/expert_stats/dump", b"").status_code == 200  # no body: return only
