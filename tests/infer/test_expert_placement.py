"""The engine with a placement of redundant experts on 8 fake CPU devices (expert axis 8): decode
equals the engine without replicas, a new placement re-copies the weights without compiling
anything, `infer.replan_every` re-plans from the counted loads, bad placements are one line."""

import jax
import numpy as np
import pytest
from flax import nnx

from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.model.routing import ExpertBias
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.placement import Placement
from frontier_jax.precision.config import PrecisionConfig
from frontier_jax.runtime.program import ModelSections, build_model_program, model_program
from tests.infer import tiny
from tests.infer.test_load_weights import CompileCounter
from tests.parallel.hot_experts import replicate_hot

R, DEVICES = 8, 8
PARAMS = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def weights():
    """(program on expert 8, params, biases of the tiny model)."""
    program = build_model_program(ModelSections(tiny.config(), MeshConfig(expert=DEVICES), PrecisionConfig()))
    _, params, biases = nnx.split(tiny.model(seed=3), nnx.Param, ExpertBias)
    return program, nnx.to_pure_dict(params), nnx.to_pure_dict(biases)


@pytest.fixture(scope="module")
def setup(weights):
    """weights + (prompts, the tokens of the one-device engine without replicas)."""
    prompts = tiny.prompts([7, 10, 4], seed=5)
    return *weights, prompts, Engine(tiny.model(seed=3), infer=tiny.INFER).generate(prompts, PARAMS)


def skewed_placement(seed: int) -> Placement:
    """A placement replicating the experts of a random skewed load (2 MoE layers x 8 experts)."""
    load = np.random.default_rng(seed).pareto(1.0, (2, 8)) + 1
    return replicate_hot(load, replicas=R, devices=DEVICES)


def assert_same(got, expected):
    # fp32: the same greedy tokens, log-probabilities within 1e-4 (8 rows a step on 8 devices
    # against the one-device engine's rows, sums in another order)
    for a, b in zip(got, expected):
        assert a.output_ids == b.output_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-4)


def test_decode_with_replicas_equals_without_and_a_new_placement_compiles_nothing(setup):
    program, params, biases, prompts, expected = setup
    first, second, third = (skewed_placement(seed) for seed in range(3))
    engine = Engine.from_program(program, params, biases, infer=tiny.INFER, placement=first)
    experts = engine.state["moe_layers"]["blocks"]["ffn"]["experts"]
    assert experts["w_up"].shape[1] == 8 + R  # the slots' copies are stored
    assert_same(engine.generate(prompts, PARAMS), expected)
    engine.set_placement(second)
    with CompileCounter() as compiles:
        engine.set_placement(third)
        got = engine.generate(prompts, PARAMS)
    assert compiles.count == 0
    assert_same(got, expected)
    # the stored copies are the logical weights gathered by the placement
    w_up = np.asarray(params["moe_layers"]["blocks"]["ffn"]["experts"]["w_up"])
    stored = np.asarray(engine.state["moe_layers"]["blocks"]["ffn"]["experts"]["w_up"])
    np.testing.assert_array_equal(
        stored, np.take_along_axis(w_up, third.physical_to_logical[..., None, None], 1)
    )
    engine.load_weights(params, biases)  # logical parameters, copied onto the slots again
    np.testing.assert_array_equal(engine.state["moe_layers"]["blocks"]["ffn"]["experts"]["w_up"], stored)


def test_replan_every_plans_from_the_counted_loads(setup, tmp_path):
    program, params, biases, prompts, expected = setup
    first = skewed_placement(0)
    first.save(tmp_path / "plan.json")
    calls = []

    def planner(load, *, replicas, devices):
        calls.append((load.copy(), replicas, devices))
        return replicate_hot(load, replicas=replicas, devices=devices)

    infer = {**vars(tiny.INFER), "expert_placement": str(tmp_path / "plan.json"), "replan_every": 2}
    engine = Engine.from_program(program, params, biases, infer=infer, planner=planner)
    np.testing.assert_array_equal(engine.placement.physical_to_logical, first.physical_to_logical)
    assert_same(engine.generate(prompts, PARAMS), expected)
    assert calls and all(r == R and d == DEVICES for _, r, d in calls)
    # the windows of the re-plans add up to the loads counted until the last one
    assert sum(load for load, _, _ in calls).sum() <= engine.expert_load().load.sum()
    assert calls[0][0].shape == (2, 8) and calls[0][0].sum() > 0
    np.testing.assert_array_equal(
        engine.placement.physical_to_logical,
        planner(calls[-1][0], replicas=R, devices=DEVICES).physical_to_logical,
    )


def test_placements_that_do_not_fit_are_one_line_errors(weights):
    program, params, biases = weights
    three_layers = Placement.from_physical(np.tile(np.arange(16) % 8, (3, 1)), 8)
    with pytest.raises(
        ValueError, match=r"the placement is for 3 MoE layers x 8 experts, the model has 2 x 8"
    ):
        Engine.from_program(program, params, biases, infer=tiny.INFER, placement=three_layers)
    odd = Placement.from_physical(np.tile(np.arange(11) % 8, (2, 1)), 8)
    with pytest.raises(
        ValueError, match=r"11 slots \(8 experts \+ 3 replicas\) do not split over 8 expert devices"
    ):
        Engine.from_program(program, params, biases, infer=tiny.INFER, placement=odd)
    one_device = model_program(ModelSections(tiny.config(), MeshConfig(), PrecisionConfig()))
    with pytest.raises(ValueError, match=r"impl.expert_replicas=8 needs expert parallelism"):
        Engine.from_program(one_device, params, biases, infer=tiny.INFER, placement=skewed_placement(0))
    model = one_device.model(params, biases)
    with pytest.raises(ValueError, match=r"an expert placement needs expert parallelism"):
        Engine(model, infer=tiny.INFER, placement=skewed_placement(0))
    with pytest.raises(ValueError, match=r"infer.replan_every=4 re-plans a placement .* there is none"):
        Engine.from_program(program, params, biases, infer={**vars(tiny.INFER), "replan_every": 4})
    plain = Engine.from_program(program, params, biases, infer=tiny.INFER)
    with pytest.raises(ValueError, match=r"the model runs no replicas: build it with impl.expert_replicas=8"):
        plain.set_placement(skewed_placement(0))
    assert jax.device_count() == 8
