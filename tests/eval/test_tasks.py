"""The benchmark harness: multiple-choice acc / acc_norm from log-likelihoods equal to a float64
reference (the model run on each prompt + choice alone), generative exact match equal to a naive
greedy loop over full forwards with the same stop string and answer extraction, and bad task
files named."""

import json

import jax
import numpy as np
import pytest

from frontier_jax.config import load_config
from frontier_jax.data.tokenizer import byte_tokenizer
from frontier_jax.eval.scorer import Scorer
from frontier_jax.eval.tasks import Task, builtin_task, load_task, run_generate, run_multiple_choice
from frontier_jax.infer import Engine
from frontier_jax.runtime.program import build_model_program

from .common import TINY_MODEL

ROWS = [
    {"question": "2 + 3", "choices": [" 5", " 6", " 23"], "answer": 0},
    {"question": "7 * 2", "choices": [" 14", " 9"], "answer": 1},
    {"question": "9 - 9", "choices": [" 0", " -1", " 100"], "answer": 2},
    # UTF-8 bytes / characters: 4/2, 4/4, 3/3; acc_norm picks " ☕" by bytes, " tea" by characters
    {"question": "café", "choices": [" ☕", " tea", " no"], "answer": 0},
]


@pytest.fixture(scope="module")
def model():
    program = build_model_program(
        load_config("model/toy", TINY_MODEL + ["model.mtp_depth=0"]), jax.devices()[:1]
    )
    params, biases = program.init(7)
    return program, params, biases


def _logp(model, ids):
    program, params, biases = model
    logits = np.asarray(program.model(params, biases)(np.asarray([ids], np.int32))[0], np.float64)
    return (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )


def test_multiple_choice_accuracy_equals_float64_reference(tmp_path, model):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "mc.yaml").write_text(
        'type: multiple_choice\ndata: rows.jsonl\nprompt: "Q: {question} =\\nA:"\n'
    )
    task = load_task(tmp_path / "mc.yaml")
    tok = byte_tokenizer()
    acc = acc_norm = by_characters = 0
    for row in ROWS:
        head = [tok.special_id("bos")] + tok.encode(f"Q: {row['question']} =\nA:")
        sums = []
        for choice in row["choices"]:
            tail = tok.encode(choice)
            logp = _logp(model, head + tail[:-1])
            sums.append(sum(logp[len(head) - 1 + i, t] for i, t in enumerate(tail)))
        sizes = [len(c.encode()) for c in row["choices"]]
        acc += int(np.argmax(sums) == row["answer"])
        acc_norm += int(np.argmax(np.asarray(sums) / sizes) == row["answer"])
        by_characters += int(np.argmax(np.asarray(sums) / [len(c) for c in row["choices"]]) == row["answer"])
    assert by_characters != acc_norm  # the non-ASCII row tells UTF-8 bytes from characters
    scorer = Scorer(*model, context=32, batch_size=2, progress=False)
    got = run_multiple_choice(task, scorer, tok)
    n = len(ROWS)
    assert got == {"acc": acc / n, "acc_norm": acc_norm / n, "rows": n}


def test_generate_exact_match_equals_naive_greedy_loop(model):
    task = builtin_task("arithmetic", rows=3)
    task = type(task)(
        **{**task.__dict__, "few_shot": 1, "max_new_tokens": 4, "stop": (" ",), "extract": r"\d"}
    )
    tok = byte_tokenizer()
    shots = f"{task.render(task.rows[0])} {task.rows[0]['answer']}\n\n"
    hits = 0
    for row in task.rows[1:]:
        ids = [tok.special_id("bos")] + tok.encode(shots + task.render(row))
        out = []
        for _ in range(task.max_new_tokens):
            nxt = int(np.argmax(_logp(model, ids + out)[-1]))
            if nxt == tok.special_id("eos"):
                break
            out.append(nxt)
            if " " in tok.decode(out):
                break
        text = tok.decode(out).split(" ")[0]
        match = __import__("re").search(r"\d", text)
        hits += int((match.group(0) if match else "") == row["answer"])
    program, params, biases = model
    got = run_generate(task, Engine(program.model(params, biases), tokenizer=tok))
    assert got["exact_match"] == hits / 2 and got["rows"] == 2


@pytest.mark.parametrize(
    "choice, message",
    [("", "has no token of its own"), (" " + "9" * 40, "has 41 tokens, more than the 32-token window")],
    ids=["empty", "longer_than_the_window"],
)
def test_a_choice_that_cannot_be_scored_is_refused_by_name(model, choice, message):
    """As lm-eval's hf backend: an empty continuation would score nothing (every window position
    was counted before), one longer than the window would lose its first tokens."""
    row = {"question": "2 + 3", "choices": [" 5", choice], "answer": 0}
    task = Task("sums", "multiple_choice", [row], "Q: {question} =\nA:")
    scorer = Scorer(*model, context=32, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=rf"task sums, row 0, choice '.*': the continuation {message}"):
        run_multiple_choice(task, scorer, byte_tokenizer())


@pytest.mark.parametrize(
    "body,rows,message",
    [
        ("type: mc\ndata: rows.jsonl\nprompt: x\n", "{}", "type='mc'"),
        ("type: generate\ndata: rows.jsonl\nprompt: x\nshots: 2\n", "{}", "unknown keys"),
        ("type: generate\ndata: missing.jsonl\nprompt: x\n", "{}", "missing.jsonl does not exist"),
        ("type: generate\ndata: rows.jsonl\nprompt: x\n", "{bad", "rows.jsonl:1: invalid JSON"),
        ("type: generate\ndata: rows.jsonl\nprompt: x\nfew_shot: 1\n", "{}", "leaves none"),
        ("type: [\n", "{}", "YAML syntax error"),
    ],
)
def test_malformed_task_file_names_the_problem(tmp_path, body, rows, message):
    (tmp_path / "rows.jsonl").write_text(rows + "\n")
    (tmp_path / "t.yaml").write_text(body)
    with pytest.raises(ValueError if "exist" not in message else FileNotFoundError, match=message):
        load_task(tmp_path / "t.yaml")


def test_unknown_task_name_lists_the_built_ins():
    with pytest.raises(ValueError, match="built-in tasks are arithmetic, arithmetic_choice"):
        builtin_task("hellaswag")


_MC = 'type: multiple_choice\ndata: rows.jsonl\nprompt: "Q: {question}\\nA:"\n'
_GEN = 'type: generate\ndata: rows.jsonl\nprompt: "Q: {question}\\nA:"\n'
_GOOD_ROW = {"question": "1 + 1", "choices": [" 2", " 3"], "answer": 0}


@pytest.mark.parametrize(
    "body,bad_row,message",
    [
        (
            _MC,
            {**_GOOD_ROW, "answer": 5},
            "rows.jsonl:2: field 'answer' = 5 is not an index of the row's 2 choices",
        ),
        (_MC, {**_GOOD_ROW, "answer": -1}, "rows.jsonl:2: field 'answer' = -1 is not an index"),
        (_MC, {**_GOOD_ROW, "answer": "1"}, "rows.jsonl:2: field 'answer' = '1' is not an index"),
        (_MC, {**_GOOD_ROW, "answer": True}, "rows.jsonl:2: field 'answer' = True is not an index"),
        (_MC, {**_GOOD_ROW, "choices": []}, "rows.jsonl:2: field 'choices' = [] must be a non-empty list"),
        (
            _MC,
            {**_GOOD_ROW, "choices": " 2"},
            "rows.jsonl:2: field 'choices' = ' 2' must be a non-empty list",
        ),
        (_MC, {"question": "1 + 1", "answer": 0}, "rows.jsonl:2: field 'choices' = None"),
        (
            _MC,
            {"choices": [" 2"], "answer": 0},
            "rows.jsonl:2: the prompt names field 'question' that the row lacks",
        ),
        (_GEN, {"question": "1 + 1"}, "rows.jsonl:2: field 'answer' = None must be the expected answer"),
        (_GEN, [1, 2], "rows.jsonl:2: a line must be a JSON object, got list"),
    ],
)
def test_bad_task_rows_are_refused_at_load_naming_file_row_and_field(tmp_path, body, bad_row, message):
    """A bad row (the second line of the data) fails when the task loads, before any model work."""
    (tmp_path / "rows.jsonl").write_text(json.dumps({**_GOOD_ROW}) + "\n" + json.dumps(bad_row) + "\n")
    (tmp_path / "t.yaml").write_text(body)
    with pytest.raises(ValueError) as err:
        load_task(tmp_path / "t.yaml")
    assert str(err.value).startswith(f"task file {tmp_path / 't.yaml'}: ") or str(err.value).startswith(
        str(tmp_path / "rows.jsonl")
    ), err.value
    assert message in str(err.value) and "\n" not in str(err.value), err.value


@pytest.mark.parametrize(
    "setting,message",
    [
        ('prompt: "Q: {question"', "is not a valid template (expected '}' before end of string)"),
        ('prompt: "Q: {}"', "has a positional field {}"),
        ('prompt: "Q: {0}"', "has a positional field {0}"),
        (
            'prompt: "Q: {question:>x}"',
            "rows.jsonl:1: the prompt 'Q: {question:>x}' does not render this row",
        ),
        ("prompt: 5", "prompt=5 must be a string"),
        (
            'extract: "(\\\\d+"',
            "extract='(\\\\d+' is not a valid regular expression (missing ), unterminated",
        ),
        ('stop: "###"', "stop='###' must be a list of non-empty strings"),
        ("stop: ['']", "stop=[''] must be a list of non-empty strings"),
        ("few_shot: -1", "few_shot=-1 must be an integer >= 0"),
        ("max_new_tokens: 0", "max_new_tokens=0 must be an integer >= 1"),
        ("target: 3", "target=3 must be the name of a row field"),
    ],
)
def test_bad_task_settings_are_refused_at_load_naming_the_key(tmp_path, setting, message):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "1 + 1", "answer": "2"}) + "\n")
    body = "type: generate\ndata: rows.jsonl\n" + ("" if setting.startswith("prompt") else "prompt: x\n")
    (tmp_path / "t.yaml").write_text(body + setting + "\n")
    with pytest.raises(ValueError) as err:
        load_task(tmp_path / "t.yaml")
    assert str(err.value).startswith(f"task file {tmp_path / 't.yaml'}: "), err.value
    assert message in str(err.value) and "\n" not in str(err.value), err.value


def test_task_data_that_is_not_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "rows.jsonl").write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "\xff"}\n')
    (tmp_path / "t.yaml").write_text(_GEN)
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not UTF-8 \(byte 0xff at column 15\)"):
        load_task(tmp_path / "t.yaml")
