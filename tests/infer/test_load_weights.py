"""Engine.from_program keeps the program's mesh and rules; Engine.load_weights swaps in new
parameters without compiling anything: its outputs equal a fresh engine's on the new weights."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.model.routing import ExpertBias
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.precision.config import PrecisionConfig
from frontier_jax.runtime.program import ModelSections, build_model_program, model_program
from tests.infer import tiny

PARAMS = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)]


def weights(model) -> tuple[dict, dict]:
    _, params, biases = nnx.split(model, nnx.Param, ExpertBias)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(biases)


class CompileCounter:
    """Counts XLA compilations (jax.monitoring's backend-compile events) inside the block."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        self.count += event == "/jax/core/compile/backend_compile_duration"

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on_event)


def test_load_weights_equals_a_fresh_engine_and_compiles_nothing():
    program = model_program(ModelSections(tiny.config(), MeshConfig(), PrecisionConfig()))
    old, new = weights(tiny.model(seed=3)), weights(tiny.model(seed=4))
    prompts = tiny.prompts([7, 10], seed=4)
    engine = Engine.from_program(program, *old, infer=tiny.INFER)
    before = engine.generate(prompts, PARAMS)
    with CompileCounter() as compiles:
        engine.load_weights(*new)
        after = engine.generate(prompts, PARAMS)
    assert compiles.count == 0
    fresh = Engine.from_program(program, *new, infer=tiny.INFER).generate(prompts, PARAMS)
    for a, f, b in zip(after, fresh, before):
        assert a.output_ids == f.output_ids != b.output_ids
        np.testing.assert_allclose(a.logprobs, f.logprobs, rtol=1e-6, atol=1e-6)


def test_load_weights_is_refused_while_requests_run_and_casts_onto_the_engines_layout():
    program = model_program(ModelSections(tiny.config(), MeshConfig(), PrecisionConfig()))
    params, biases = weights(tiny.model(seed=3))
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    engine = Engine.from_program(program, bf16, biases, infer=tiny.INFER)
    request = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4))
    engine.step()
    with pytest.raises(RuntimeError, match=rf"load_weights while 1 requests run \(ids {request}\)"):
        engine.load_weights(params, biases)
    engine.cancel(request)
    before = traverse_util.flatten_dict(engine.state)
    engine.load_weights(params, biases)  # fp32 parameters onto the engine's bf16 ones
    after = traverse_util.flatten_dict(engine.state)
    assert after[("embed", "embedding")].dtype == jnp.bfloat16
    for path, leaf in after.items():
        assert leaf.dtype == before[path].dtype and leaf.sharding == before[path].sharding, path
    with pytest.raises(ValueError, match=r"load_weights: parameter embed\.embedding is missing"):
        engine.load_weights({k: v for k, v in params.items() if k != "embed"}, biases)


def test_from_program_keeps_the_programs_mesh_and_rules():
    cfg = ModelSections(tiny.config(), MeshConfig(data=2, expert=4), PrecisionConfig())
    program = build_model_program(cfg, jax.devices()[:8])
    params, biases = weights(tiny.model(seed=3))
    engine = Engine.from_program(program, params, biases, infer=tiny.INFER)
    assert engine.mesh is program.mesh and engine.rules == dict(program.rules)
    shardings = program.shardings()[0]
    for leaf, sharding in zip(jax.tree.leaves(engine.state["embed"]), jax.tree.leaves(shardings["embed"])):
        assert leaf.sharding == sharding
    assert engine.scheduler.min_rows == 8  # the batch split over data x expert


def test_an_engine_over_a_scalar_head_program_is_refused():
    program = types.SimpleNamespace(cfg=types.SimpleNamespace(model=types.SimpleNamespace(head="scalar")))
    with pytest.raises(ValueError, match="model.head=scalar: an Engine generates tokens"):
        Engine.from_program(program, {}, {})
