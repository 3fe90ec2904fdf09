"""The held-out splits of the embedded data (`eval.datasets`): the code files a training run reads
last are absent from everything its data stream feeds it, the first file of its pass is not (the
check can fail); a run long enough to reach them is refused; per-source document and character
limits; math of eval.seed."""

from __future__ import annotations

import numpy as np
import pytest

from frontier_jax.config import load_config
from frontier_jax.data import embedded, load_tokenizer
from frontier_jax.data.pipeline import source_documents
from frontier_jax.eval.config import EvalConfig, EvalSourceConfig
from frontier_jax.eval.datasets import TrainingRun, read_documents
from frontier_jax.train.batches import data_iterator

STEPS = 40  # the toy ablations' runs
TOY = ["train.steps=40", "train.global_batch=8"]
CODE = EvalSourceConfig(name="code_held_out", kind="embedded_code", max_documents=16, max_chars=4000)


def _found(document: str, text: str) -> bool:
    """Any of 48-character pieces of the document (every 400 characters) is in `text` (a piece
    this short lies within one training row of 128 tokens but for the few that straddle two)."""
    return any(document[i : i + 48] in text for i in range(200, min(len(document), 4000) - 48, 400))


def _trained_text(cfg, tokenizer) -> str:
    """Every row the run's data stream feeds its STEPS steps, decoded."""
    batches = data_iterator(cfg)
    rows = [row for _ in range(STEPS) for row in np.asarray(next(batches)["input_ids"])]
    return "\n".join(tokenizer.decode(row.tolist()) for row in rows)


def test_held_out_code_is_what_the_training_stream_reads_last_and_never_feeds():
    cfg = load_config("train/toy", TOY)
    tokenizer = load_tokenizer("byte")
    run = TrainingRun.of(cfg.to_dict(), STEPS)
    assert run.tokens == STEPS * 8 * 128 + (cfg.data.shuffle_window + 1) * 128  # the window read ahead
    held = read_documents(CODE, cfg.eval, tokenizer, run)
    assert held.name == "code_held_out" and len(held.documents) == 16
    code = next(s for s in cfg.data.sources if s.kind == "embedded_code")
    first_pass = list(source_documents(cfg.data, code, num_epochs=1))
    assert held.documents == [d[:4000] for d in first_pass[-16:]]
    trained = _trained_text(cfg, tokenizer)
    assert any(_found(d, trained) for d in first_pass[:40])  # what the stream reads first is found
    assert not any(_found(d, trained) for d in held.documents)


def test_held_out_code_is_refused_for_a_run_that_may_have_read_it():
    cfg = load_config("train/toy", TOY)
    tokenizer = load_tokenizer("byte")
    code = next(s for s in cfg.data.sources if s.kind == "embedded_code")
    before = sum(len(d.encode()) + 1 for d in list(source_documents(cfg.data, code, num_epochs=1))[:-16])
    assert len(read_documents(CODE, cfg.eval, tokenizer, TrainingRun(cfg.data, before - 1)).documents) == 16
    with pytest.raises(ValueError, match=f"code_held_out.*may have read {before:,} token pairs"):
        read_documents(CODE, cfg.eval, tokenizer, TrainingRun(cfg.data, before))


def test_without_a_training_run_code_is_read_in_name_order_and_limits_apply_per_source():
    tokenizer = load_tokenizer("byte")
    cfg = EvalConfig(max_documents=5)
    code = read_documents(
        EvalSourceConfig(name="c", kind="embedded_code", max_documents=2, max_chars=100), cfg, tokenizer
    )
    texts = list(embedded.code_dataset())
    assert code.documents == [texts[0][:100], texts[1][:100]]
    math = read_documents(EvalSourceConfig(name="m", kind="embedded_math"), cfg, tokenizer)
    assert math.documents == [embedded.math_problem(cfg.seed, i) for i in range(5)]
    assert cfg.seed != load_config("train/toy", []).data.seed  # not the problems training generates


def test_training_run_bounds_the_pairs_read_per_context_stage():
    """Full batches per stage, plus the shuffle window (and the packer's chunk) of the longest
    rows reached, read ahead of them."""
    train = {"global_batch": 8, "seq_len": 128}
    data = {"shuffle_window": 100}
    assert TrainingRun.of({"train": train, "data": data}, 25).tokens == 25 * 8 * 128 + 101 * 128
    assert (
        TrainingRun.of({"train": train, "data": {**data, "shuffle": False}}, 25).tokens == 25 * 8 * 128 + 128
    )
    stages = [
        {"until_step": 10, "seq_len": 128, "global_batch": 8},
        {"until_step": 40, "seq_len": 512, "global_batch": 4},
    ]
    staged = {"train": {**train, "stages": stages}, "data": data}
    assert TrainingRun.of(staged, 25).tokens == 10 * 8 * 128 + 15 * 4 * 512 + 101 * 512
    assert TrainingRun.of(staged, 5).tokens == 5 * 8 * 128 + 101 * 128
