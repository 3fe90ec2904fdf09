"""Inference and evaluation compute with dropless expert dispatch whatever the run trained with
(`runtime.program.inference_impl`).

The checkpoint is laid out as training writes it (the state's params and biases, the resolved
run config) and its config says the run trained with impl.moe_dispatch=capacity at a capacity
factor of 0.5, so capacity dispatch would drop half the expert assignments of every forward.
Its weights are those of a random tiny Hugging Face DeepseekV3, which is the reference: the
engine's greedy tokens equal transformers `generate` (CPU torch, fp32) for each of four prompts,
alone and batched; the scorer's perplexity does not depend on eval.batch_size (relative 1e-6:
fp32 forwards of other batch shapes); an explicit impl.moe_dispatch=capacity at load wins, with
one warning."""

from __future__ import annotations

import logging

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from frontier_jax.config import Config
from frontier_jax.convert import from_hf
from frontier_jax.eval.config import EvalConfig
from frontier_jax.eval.model import load_checkpoint
from frontier_jax.eval.perplexity import evaluate_documents
from frontier_jax.eval.run import build_scorer
from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.model.config import ImplConfig
from frontier_jax.model.routing import ExpertBias
from frontier_jax.ops.dispatch import MoeDispatch
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.runtime.restore import restore_params
from tests.convert.helpers import tiny_hf_model
from tests.eval.common import DOCUMENTS
from tests.infer.test_engine import hf_greedy

CAPACITY = ImplConfig(moe_dispatch=MoeDispatch.capacity, moe_capacity_factor=0.5)
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def capacity_run(tmp_path_factory):
    """(run directory of a checkpoint trained with capacity dispatch, the HF model of its weights)."""
    root = tmp_path_factory.mktemp("capacity_run")
    hf = tiny_hf_model(seed=3, vocab_size=272)  # the byte tokenizer's vocabulary, for the documents
    hf.save_pretrained(root / "hf")
    model_cfg, model = from_hf(str(root / "hf"))
    _, params, biases = nnx.split(model, nnx.Param, ExpertBias)
    config = Config(model=model_cfg, impl=CAPACITY, mesh=MeshConfig(data=1)).to_dict()
    with ocp.CheckpointManager((root / "run" / "checkpoints").resolve()) as manager:
        manager.save(
            1,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(
                    {"params": nnx.to_pure_dict(params), "biases": nnx.to_pure_dict(biases)}
                ),
                config=ocp.args.JsonSave(config),
            ),
        )
        manager.wait_until_finished()
    return root / "run", hf


def test_engine_decodes_alone_and_batched_as_transformers(capacity_run):
    run_dir, hf = capacity_run
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 272, n).tolist() for n in (5, 8, 6, 7)]
    engine = Engine.from_checkpoint(
        str(run_dir), infer={"block_size": 32, "max_seqs": 4, "max_len": 32, "prefill_chunk": 8}
    )
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    batched = engine.generate(prompts, greedy)
    alone = [engine.generate([prompt], greedy)[0] for prompt in prompts]
    for prompt, together, single in zip(prompts, batched, alone):
        assert together.output_ids == single.output_ids == hf_greedy(hf, prompt, NEW_TOKENS)


def test_scorer_perplexity_does_not_depend_on_the_batch_size(capacity_run):
    run_dir, _ = capacity_run
    model = load_checkpoint(str(run_dir), None, mesh=MeshConfig(data=1), dtype=None, devices=1)
    figures = []
    for batch_size in (1, 4):
        scorer, stride = build_scorer(model, EvalConfig(seq_len=16, batch_size=batch_size), progress=False)
        figures.append(evaluate_documents(scorer, model.tokenizer, DOCUMENTS, stride=stride)["perplexity"])
    np.testing.assert_allclose(figures[0], figures[1], rtol=1e-6)
    assert model.program.cfg.impl == CAPACITY.replace(moe_dispatch=MoeDispatch.dropless)


def test_impl_given_at_load_wins_with_one_warning(capacity_run, caplog):
    run_dir, _ = capacity_run
    with caplog.at_level(logging.WARNING, logger="frontier_jax"):
        assert restore_params(run_dir).program.cfg.impl.moe_dispatch == MoeDispatch.dropless
        restored = restore_params(run_dir, impl={"moe_dispatch": "capacity"})
    assert restored.program.cfg.impl == CAPACITY
    ours = [r.getMessage() for r in caplog.records if r.name == "frontier_jax.runtime.program"]
    assert len(ours) == 1 and ours[0].startswith("impl.moe_dispatch=capacity given")
