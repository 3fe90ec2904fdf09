"""The lm-eval adapter against lm-eval's own `hf` backend, with the real `lm_eval` package, on
one random tiny Hugging Face DeepseekV3 saved to disk (with the byte tokenizer as tokenizer.json):
three local YAML tasks over local JSONL files (multiple-choice log-likelihood, rolling
log-likelihood, greedy generation with a stop string), offline.  Same per-request
log-likelihoods (absolute 1e-4: fp32 torch vs fp32 XLA over sums of ~20 tokens), same greedy
flags, same generations and the same metrics."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")  # the `test` extra installs it  # noqa: E402

from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import frontier_jax.eval.lm_eval  # noqa: E402,F401  (registers the model)
from frontier_jax.data.tokenizer import byte_tokenizer  # noqa: E402
from tests.convert.helpers import tiny_hf_model  # noqa: E402

TASKS = {
    "toy_choice": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: acc}, {metric: acc_norm}]
""",
    "toy_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
    "toy_generate": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 6, do_sample: false}
metric_list: [{metric: exact_match}]
""",
}
ROWS = [
    {
        "question": "Q: 2 + 3 = ?\nA:",
        "choices": [" 5", " 6", " 23"],
        "answer": 0,
        "text": "def f(x):\n    return x\n",
    },
    {
        "question": "Q: 7 * 2 = ?\nA:",
        "choices": [" 14", " 9"],
        "answer": 0,
        "text": "héllo wörld, 12 + 30 = 42",
    },
    {
        "question": "The sky is",
        "choices": [" blue", " green", " a very long answer"],
        "answer": 1,
        "text": "x",
    },
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / "hf"
    tiny_hf_model(seed=1, vocab_size=272).save_pretrained(model_dir)
    byte_tokenizer()._tok.save(str(root / "byte.json"))
    PreTrainedTokenizerFast(
        tokenizer_file=str(root / "byte.json"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(model_dir)
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}"
        )
    return model_dir, TaskManager(include_path=str(tasks))


def _run(model: str, model_args: str, manager) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(TASKS),
        task_manager=manager,
        batch_size=2,
        log_samples=True,
        apply_chat_template=False,
        device="cpu",
    )


def test_adapter_matches_hf_backend_per_request_and_metrics(setup):
    model_dir, manager = setup
    ours = _run("frontier_jax", f"hf={model_dir},max_length=64", manager)
    ref = _run("hf", f"pretrained={model_dir},dtype=float32,max_length=64", manager)
    for task in TASKS:
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        theirs = sorted(ref["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine) == len(theirs) == len(ROWS)
        for a, b in zip(mine, theirs):
            for got, want in zip(a["resps"], b["resps"]):
                got, want = got[0], want[0]
                if task == "toy_generate":
                    assert got == want
                elif task == "toy_rolling":
                    assert abs(got - want) < 1e-4
                else:
                    assert abs(got[0] - want[0]) < 1e-4 and got[1] == want[1]
        for metric, value in ref["results"][task].items():
            if metric.endswith(",none") and "stderr" not in metric:
                np.testing.assert_allclose(ours["results"][task][metric], value, rtol=1e-5, atol=1e-6)
