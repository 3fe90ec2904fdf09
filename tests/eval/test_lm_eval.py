"""The lm-eval adapter against lm-eval's own `hf` backend, with the real `lm_eval` package, on
one random tiny Hugging Face DeepseekV3 saved to disk (with the byte tokenizer as tokenizer.json):
three local YAML tasks over local JSONL files (multiple-choice log-likelihood, rolling
log-likelihood, greedy generation with a stop string), offline.  Same per-request
log-likelihoods (absolute 1e-4: fp32 torch vs fp32 XLA over sums of ~20 tokens), same greedy
flags, same generations and the same metrics, with every request inside a window of 64 tokens
and at a window of 16 (contexts truncated from the left, documents rolled over several windows,
generation contexts cut to max_length - max_gen_toks).  Requests the `hf` backend refuses (a
continuation with no token of its own, one longer than the window, max_gen_toks >= max_length)
are refused; a generation whose context is longer than 2,047 tokens equals the `hf` backend's."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")  # the `test` extra installs it  # noqa: E402

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from frontier_jax.data.tokenizer import byte_tokenizer  # noqa: E402
from frontier_jax.eval.lm_eval import FrontierJaxLM  # noqa: E402  (registers the model)
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
        "choices": [" blue", " green", " a long answer"],
        "answer": 1,
        "text": "x",
    },
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / "hf"
    tiny_hf_model(seed=1, vocab_size=272, max_position_embeddings=4096).save_pretrained(model_dir)
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


def _run(model, model_args: str, manager) -> dict:
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


def _hf_backend(model_dir, max_length: int) -> HFLM:
    return HFLM(pretrained=str(model_dir), dtype="float32", max_length=max_length, batch_size=2, device="cpu")


@pytest.mark.parametrize("max_length", [64, 16])
def test_adapter_matches_hf_backend_per_request_and_metrics(setup, max_length):
    model_dir, manager = setup
    if max_length == 16:  # requests that a window of 16 cuts: contexts, documents, generation contexts
        assert max(len(r["question"]) + len(c) for r in ROWS for c in r["choices"]) > max_length + 1
        assert max(len(r["text"].encode()) for r in ROWS) > max_length
        assert max(len(r["question"]) for r in ROWS) > max_length - 6  # generation_kwargs' max_gen_toks
    adapter = FrontierJaxLM(hf=str(model_dir), max_length=max_length, batch_size=2)
    ours = _run(adapter, None, manager)
    ref = _run(_hf_backend(model_dir, max_length), None, manager)
    # the generation engine holds batch_size sequences (rounded up to the 8-way batch split)
    # of max_length tokens
    assert (adapter._engine.layout.max_len, adapter._engine.infer.max_seqs) == (max_length, 8)
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


@pytest.mark.parametrize(
    "request_type, arguments, message",
    [
        ("loglikelihood", ("Q: 2 + 3 = ?\nA:", ""), "has no token of its own"),
        (
            "loglikelihood",
            ("The sky is", " a very long answer"),
            "has 19 tokens, more than the 16-token window",
        ),
        (
            "generate_until",
            ("The sky is", {"until": ["\n"], "max_gen_toks": 16}),
            "max_gen_toks=16 must be in",
        ),
    ],
    ids=["empty_continuation", "continuation_past_the_window", "no_room_for_the_context"],
)
def test_requests_the_hf_backend_refuses_are_refused(setup, request_type, arguments, message):
    model_dir, _ = setup
    request = Instance(request_type, {}, arguments, 0)
    with pytest.raises(AssertionError):
        getattr(_hf_backend(model_dir, 16), request_type)([request])
    with pytest.raises(ValueError, match=message):
        getattr(FrontierJaxLM(hf=str(model_dir), max_length=16, batch_size=2), request_type)([request])


@pytest.mark.slow  # 16 s of CPU (prefill programs for four block-table widths); the default run
# checks the engine's size in test_adapter_matches_hf_backend_per_request_and_metrics
def test_generation_from_a_context_past_2047_tokens_equals_hf_backend(setup):
    """The engine holds max_length tokens (not the default infer.max_len of 2,048): a 2,100-token
    context is cut to max_length - max_gen_toks tokens and 8 tokens are generated after it."""
    model_dir, _ = setup
    context = "".join(r["text"] for r in ROWS) * 50
    assert len(context.encode()) > 2100
    request = Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": 8}), 0)
    ours = FrontierJaxLM(hf=str(model_dir), max_length=2100, batch_size=2).generate_until([request])
    assert ours == _hf_backend(model_dir, 2100).generate_until([request])
