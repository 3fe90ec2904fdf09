"""Sharded decode on 8 fake CPU devices equals one device: tensor-parallel heads with
expert-parallel experts, and the batch over data with expert parallelism (also with 4 decode
steps per dispatch)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from frontier_jax.infer import Engine, InferConfig, SamplingParams
from frontier_jax.model import Transformer
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.expert import expert_dispatcher
from frontier_jax.parallel.mesh import build_mesh
from frontier_jax.parallel.rules import DEFAULT_RULES
from tests.model import common

pytestmark = pytest.mark.slow  # long: excluded from the default run (pyproject addopts)

INFER = InferConfig(block_size=8, max_seqs=8, max_len=32, prefill_chunk=6)


@pytest.fixture(scope="module")
def single_device():
    cfg = common.tiny_config(vocab_size=64, num_heads=4)
    model = common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=7)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 9, 3)]
    params = SamplingParams(max_new_tokens=10)
    return cfg, model, prompts, params, Engine(model, infer=INFER).generate(prompts, params)


@pytest.mark.parametrize(
    "axes, steps",
    [(dict(tensor=2, expert=4, data=1), 1), (dict(data=2, expert=4), 1), (dict(data=2, expert=4), 4)],
    ids=["tensor2_expert4", "data2_expert4", "data2_expert4_4_steps_per_dispatch"],
)
def test_sharded_decode_equals_single_device(single_device, axes, steps):
    cfg, model, prompts, params, expected = single_device
    mesh = build_mesh(MeshConfig(**axes), jax.devices()[:8])
    sharded = nnx.eval_shape(
        lambda: Transformer(cfg, experts=expert_dispatcher(mesh, DEFAULT_RULES), rngs=nnx.Rngs(0))
    )
    nnx.update(sharded, nnx.state(model))
    infer = dataclasses.replace(INFER, decode_steps_per_dispatch=steps)
    got = Engine(sharded, infer=infer, mesh=mesh).generate(prompts, params)
    for a, b in zip(expected, got):
        assert b.output_ids == a.output_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-4, atol=1e-4)
