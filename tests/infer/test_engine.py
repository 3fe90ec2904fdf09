"""The engine end to end: greedy generation equals Hugging Face `generate`, continuous batching
does not change a request's tokens, and bad requests fail alone."""

import re

import numpy as np
import pytest
import torch

from frontier_jax.convert import from_hf
from frontier_jax.infer import Engine, InferConfig, SamplingParams
from tests.convert.helpers import TINY, YARN, tiny_hf_model

NEW_TOKENS = 32
INFER = InferConfig(block_size=8, max_seqs=4, max_len=64, prefill_chunk=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, our imported model) of a random tiny DeepseekV3 with YaRN."""
    hf = tiny_hf_model(seed=1, rope_scaling=YARN)
    path = str(tmp_path_factory.mktemp("tiny_v3"))
    hf.save_pretrained(path)
    return hf, from_hf(path)[1]


def prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TINY["vocab_size"], n).tolist() for n in lengths]


def hf_greedy(hf, prompt: list[int], new_tokens: int) -> list[int]:
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():  # explicit mask: generate would otherwise take pad-id tokens for padding
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_generation_equals_transformers_generate(tiny):
    hf, model = tiny
    batch = prompts([3, 17, 9])  # 17: four prefill chunks of 5, one crossing two blocks of 8
    completions = Engine(model, infer=INFER).generate(batch, SamplingParams(max_new_tokens=NEW_TOKENS))
    for prompt, completion in zip(batch, completions):
        assert completion.prompt_ids == prompt
        assert completion.finish_reason == "length" and len(completion.output_ids) == NEW_TOKENS
        assert completion.output_ids == hf_greedy(hf, prompt, NEW_TOKENS)
        assert all(lp <= 0 for lp in completion.logprobs) and len(completion.logprobs) == NEW_TOKENS


def test_request_admitted_mid_stream_gives_the_same_tokens_as_alone(tiny):
    _, model = tiny
    first, late = prompts([6, 11], seed=1)
    greedy = SamplingParams(max_new_tokens=20)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    engine = Engine(model, infer=INFER)
    first_id = engine.submit(first, greedy)
    for _ in range(6):  # the first request is decoding when the second arrives
        engine.step()
    late_id = engine.submit(late, sampled)
    while not engine.scheduler.idle:
        engine.step()
    for request_id, prompt, params in [(first_id, first, greedy), (late_id, late, sampled)]:
        alone = Engine(model, infer=INFER).generate([prompt], params)[0]
        together = engine.result(request_id)
        assert together.output_ids == alone.output_ids
        np.testing.assert_allclose(together.logprobs, alone.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "prompt is empty"),
        ([3, TINY["vocab_size"]], SamplingParams(), r"token id 64 at index 1 is outside \[0, 64\)"),
        ([-1], SamplingParams(), "outside"),
        (list(range(64)), SamplingParams(), "the prompt has 64 tokens; at most 63 fit"),
        ([1, 2], SamplingParams(temperature=-0.5), "temperature=-0.5 must be >= 0"),
        ([1, 2], SamplingParams(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        ([1, 2], SamplingParams(top_p=1.5), "top_p=1.5"),
        ([1, 2], SamplingParams(top_k=-1), "top_k=-1 must be an integer >= 0"),
        ("text", SamplingParams(), "no tokenizer"),
    ],
    ids=[
        "empty",
        "id_past_vocab",
        "negative_id",
        "too_long",
        "temperature",
        "top_p_zero",
        "top_p_big",
        "top_k",
        "text_without_tokenizer",
    ],
)
def test_bad_request_fails_alone(tiny, prompt, params, message):
    _, model = tiny
    good = prompts([5], seed=2)[0]
    engine = Engine(model, infer=INFER)
    bad, ok = engine.generate([prompt, good], [params, SamplingParams(max_new_tokens=4)])
    assert bad.finish_reason == "error" and bad.output_ids == []
    assert bad.error.startswith("request 0: ")
    assert re.search(message, bad.error), bad.error
    assert ok.finish_reason == "length" and len(ok.output_ids) == 4
