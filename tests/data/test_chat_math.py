"""The embedded chat arithmetic source (`data/chat_math.py`): the difficulty settings, the answer
format, the held-out hash bucket kept out of every training stream and prompt set, and its
batches (chats packed with document masking, loss on the assistant answers only)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from frontier_jax.data import DataConfig, SourceConfig, build_train_iterator, byte_tokenizer
from frontier_jax.data.chat_math import (
    HELD_OUT_BUCKETS,
    Difficulty,
    exclude_held_out,
    extract_answer,
    held_out_problems,
    is_held_out,
    train_problem,
    train_problems,
    write_problems,
)


def _expression(question: str) -> str:
    match = re.fullmatch(r"What is (.+)\?", question)
    assert match, question
    return match.group(1)


def test_problems_follow_their_difficulty_and_answers_are_python_arithmetic():
    level = Difficulty(min_operations=2, max_operations=3, max_operand=9, max_factor=4)
    for index in range(300):
        problem = train_problem(5, index, level)
        expression = _expression(problem.question)
        assert 2 <= sum(expression.count(op) for op in " + - * ".split()) <= 3
        assert all(0 <= int(n) <= 9 for n in re.findall(r"\d+", expression))
        assert problem.answer == str(eval(expression))  # the expression as Python reads it
        assert problem.messages() == (
            ("user", problem.question),
            ("assistant", f"<answer>{problem.answer}</answer>"),
        )
    assert extract_answer("so <answer> -12 </answer> done") == "-12"
    assert extract_answer("<answer>twelve</answer>") is None and extract_answer("12") is None


def test_held_out_questions_are_a_hash_bucket_never_drawn_for_training(tmp_path):
    level = Difficulty()  # one operation over the embedded ranges
    held_out = held_out_problems(level, 500)
    questions = [p.question for p in held_out]
    assert len(set(questions)) == 500 and all(map(is_held_out, questions))
    trained = {p.question for seed in (0, 1) for p in train_problems(level, 5000, seed)}
    assert not trained & set(questions)
    assert not any(map(is_held_out, trained))
    # the bucket is a share of about 1 / HELD_OUT_BUCKETS of the distinct questions
    drawn = {p.question for p in held_out_problems(Difficulty(max_operand=30), 40, seed=3)}
    assert drawn and all(map(is_held_out, drawn))
    share = np.mean([is_held_out(f"What is {a} + {b}?") for a in range(100) for b in range(100)])
    assert abs(share - 1 / HELD_OUT_BUCKETS) < 0.01

    rows = [p.row() for p in held_out[:5]] + [p.row() for p in train_problems(level, 7, 9)]
    kept, dropped = exclude_held_out(rows)
    assert dropped == 5 and kept == rows[5:]
    path = write_problems(tmp_path / "held_out.jsonl", held_out)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [p.row() for p in held_out]


def test_a_level_with_too_few_held_out_questions_and_a_bad_level_are_errors():
    with pytest.raises(ValueError, match="gave only .* distinct held-out problems, fewer than 500"):
        held_out_problems(Difficulty(max_operand=9, max_factor=9), 500)
    bad = SourceConfig("m", "embedded_chat_math", difficulty=Difficulty(min_operations=2, max_operations=1))
    with pytest.raises(ValueError, match=r"data.sources\[0\].difficulty: min_operations=2, max_operations=1"):
        DataConfig(sources=[bad]).validate()


def test_batches_pack_whole_chats_with_loss_on_the_answers_only():
    cfg = DataConfig(
        sources=[SourceConfig("chat", "embedded_chat_math", difficulty=Difficulty(max_operand=20))],
        mask_documents=True,
        shuffle=False,
    )
    batch = next(build_train_iterator(cfg, seq_len=96, global_batch=4))
    tok = byte_tokenizer()
    answers = re.compile(r"(<answer>-?\d+</answer><\|end\|>)+")
    for row in range(4):
        trained = tok.decode(batch["targets"][row][batch["loss_mask"][row] == 1].tolist())
        assert answers.fullmatch(trained), trained
        documents = set(batch["segment_ids"][row]) - {0}
        assert trained.count("<answer>") == len(documents) >= 2  # every packed chat trains its answer
        for doc in documents:  # positions restart in each document, which opens with <bos>
            where = np.flatnonzero(batch["segment_ids"][row] == doc)
            assert batch["positions"][row, where].tolist() == list(range(len(where)))
            assert batch["input_ids"][row, where[0]] == tok.bos_id
