"""Chat tasks (`eval/chat.py`): unbiased pass@k equals the share of k-subsets of the samples
holding a correct one (enumerated), and `run_chat`'s figures equal a naive loop that asks the
engine one request at a time (greedy, then each seeded sample alone) and counts by hand."""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest

from frontier_jax.data import byte_tokenizer
from frontier_jax.data.template import render_prompt
from frontier_jax.eval.chat import ChatTask, chat_task, pass_at_k, run_chat
from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.runtime.program import build_model_program
from tests.train.common import tiny_config


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 2), (6, 3, 4), (4, 4, 2), (6, 1, 6)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
    correct = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(correct, k))
    assert pass_at_k(n, c, k) == pytest.approx(np.mean([any(s) for s in subsets]), abs=1e-12)


def test_run_chat_equals_a_naive_loop_over_single_requests():
    cfg = tiny_config("model.mtp_depth=0")
    program = build_model_program(cfg, jax.devices()[:1])
    params, biases = jax.jit(program.init, static_argnums=0, out_shardings=program.shardings())(7)
    tok = byte_tokenizer()
    engine = Engine.from_program(program, params, biases, tokenizer=tok, infer={"max_seqs": 16})
    n, seed, pattern = 4, 3, r"(\S)"  # the answer: a completion's first visible character
    prompts = ["What is 1 + 1?", "What is 12 - 5?", "What is 3 * 4?"]
    stop = (tok.special_id("end"),)

    def answer(text):
        visible = text.split()
        return visible[0][0] if visible else None

    greedy, samples = [], []
    for i, prompt in enumerate(prompts):
        ids = render_prompt(tok, [("user", prompt)])
        greedy.append(engine.generate([ids], SamplingParams(max_new_tokens=6, stop_token_ids=stop))[0].text)
        samples.append(
            [
                engine.generate(
                    [ids],
                    SamplingParams(
                        max_new_tokens=6, temperature=1.0, seed=seed * 2**20 + i * n + j, stop_token_ids=stop
                    ),
                )[0].text
                for j in range(n)
            ]
        )
    gold = [answer(greedy[0]) or "x", "never", answer(samples[2][0]) or "x"]
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, gold)]
    task = ChatTask("t", rows, samples=n, pass_k=(1, 2), max_new_tokens=6, seed=seed, answer_pattern=pattern)
    got = run_chat(task, engine, tok, None)

    correct = [sum(answer(s) == g for s in row) for row, g in zip(samples, gold)]
    assert correct[2] >= 1
    assert got["exact_match"] == np.mean([answer(t) == g for t, g in zip(greedy, gold)])
    assert got["format_rate"] == np.mean([answer(t) is not None for t in greedy])
    for k in (1, 2):
        want = np.mean(
            [
                np.mean([any(s) for s in itertools.combinations([True] * c + [False] * (n - c), k)])
                for c in correct
            ]
        )
        assert got[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
    assert got["sample_format_rate"] == np.mean([answer(s) is not None for row in samples for s in row])
    assert got["spread"] == np.mean([0 < c < n for c in correct])
    assert [e["generation"] for e in got["examples"]] == greedy


def test_a_prompt_set_with_a_missing_answer_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(
        json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n" + json.dumps({"prompt": "q"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"set.jsonl:2: field 'answer' is missing or empty"):
        chat_task(str(path))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": 2}) + "\n")
    assert chat_task(str(good)).rows == [{"prompt": "What is 1 + 1?", "answer": "2"}]
    with pytest.raises(ValueError, match="pass@8 needs 1 <= k <= samples=4"):
        chat_task(str(good), samples=4, pass_k=(1, 8))
