"""The training loop's evaluate hook (eval/run.py `training_evaluator`) scores with the program it
is given: after a context stage changes the RoPE scaling, with the new stage's model."""

from __future__ import annotations

import dataclasses
import json

import jax

from frontier_jax.config import load_config
from frontier_jax.data import load_tokenizer
from frontier_jax.eval.run import training_evaluator
from frontier_jax.model.config import RopeScalingConfig
from frontier_jax.runtime.program import build_model_program

from .common import DOCUMENTS, TINY_MODEL


def test_a_new_program_gets_a_new_scorer(tmp_path):
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    cfg = load_config(
        "model/toy",
        TINY_MODEL
        + ["eval.seq_len=16", "eval.batch_size=8", "eval.max_documents=0"]
        + [f"eval.data=[{{name: held_out, kind: jsonl, path: {data}}}]"],
    )
    yarn = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=4, mscale_all_dim=1.0)
    one = jax.devices()[:1]
    first = build_model_program(cfg, one)
    second = build_model_program(
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope_scaling=yarn)), one
    )
    params, biases = first.init(0)
    tokenizer = load_tokenizer("byte")

    evaluate = training_evaluator(cfg, tokenizer)
    before, after = evaluate(first, params, biases), evaluate(second, params, biases)
    assert before != after  # the same parameters under another RoPE scaling
    assert after == training_evaluator(cfg, tokenizer)(second, params, biases)
    assert evaluate(first, params, biases) == before


def test_figures_use_dropless_dispatch_whatever_training_uses(tmp_path):
    """A run training with capacity dispatch (factor 0.5: half of each forward's expert
    assignments dropped) is evaluated with dropless dispatch: the same figures, bit for bit, as
    the evaluator gives the same parameters under a dropless program."""
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    overrides = TINY_MODEL + [
        "eval.seq_len=16",
        "eval.batch_size=4",
        "eval.max_documents=0",
        f"eval.data=[{{name: held_out, kind: jsonl, path: {data}}}]",
    ]
    capacity = load_config(
        "model/toy", overrides + ["impl.moe_dispatch=capacity", "impl.moe_capacity_factor=0.5"]
    )
    one = jax.devices()[:1]
    trained, dropless = (
        build_model_program(capacity, one),
        build_model_program(load_config("model/toy", overrides), one),
    )
    params, biases = trained.init(0)
    tokenizer = load_tokenizer("byte")
    got = training_evaluator(capacity, tokenizer)(trained, params, biases)
    assert got == training_evaluator(capacity, tokenizer)(dropless, params, biases)
