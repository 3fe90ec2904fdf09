"""The engine with a placement of redundant experts on 8 fake CPU devices (expert axis 8): decode
equals the unsharded model without replicas, `infer.replan_every` re-plans from the counted
loads and a new placement re-copies the weights without compiling anything, bad placements are
one line."""

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
from tests.model import common
from tests.parallel.hot_experts import replicate_hot

R, DEVICES = 8, 8
PARAMS = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def weights():
    """(program on expert 8, params, biases of the tiny model)."""
    program = build_model_program(ModelSections(tiny.config(), MeshConfig(expert=DEVICES), PrecisionConfig()))
    _, params, biases = nnx.split(tiny.model(seed=3), nnx.Param, ExpertBias)
    return program, nnx.to_pure_dict(params), nnx.to_pure_dict(biases)


def skewed_placement(seed: int) -> Placement:
    """A placement replicating the experts of a random skewed load (2 MoE layers x 8 experts)."""
    load = np.random.default_rng(seed).pareto(1.0, (2, 8)) + 1
    return replicate_hot(load, replicas=R, devices=DEVICES)


def assert_model_outputs(prompts, completions):
    """The completions are the unsharded model's without replicas: each greedy token the argmax
    of its one-device forward over prompt + output, each log-probability its log-softmax
    (fp32, within 1e-4: 8 rows a step on 8 devices, sums in another order)."""
    sequences = [p + c.output_ids for p, c in zip(prompts, completions)]
    ids = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
    logp = np.asarray(jax.nn.log_softmax(common.fast_jit(lambda m, ids: m(ids))(tiny.model(seed=3), ids), -1))
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        positions = np.arange(len(prompt) - 1, len(sequences[row]) - 1)
        assert completion.output_ids == logp[row, positions].argmax(-1).tolist()
        np.testing.assert_allclose(
            completion.logprobs, logp[row, positions, completion.output_ids], rtol=1e-4, atol=1e-4
        )


def test_decode_with_replicas_equals_the_model_and_replans_without_compiling(weights, tmp_path):
    program, params, biases = weights
    prompts = tiny.prompts([7, 10, 4], seed=5)
    first, second = skewed_placement(0), skewed_placement(1)
    first.save(tmp_path / "plan.json")
    calls = []

    def planner(load, *, replicas, devices):
        calls.append((load.copy(), replicas, devices))
        return replicate_hot(load, replicas=replicas, devices=devices)

    infer = {  # (no prefix cache: the second generate of the same prompts would prefill other shapes)
        **vars(tiny.INFER),
        "expert_placement": str(tmp_path / "plan.json"),
        "replan_every": 2,
        "prefix_cache": False,
    }
    engine = Engine.from_program(program, params, biases, infer=infer, planner=planner)
    np.testing.assert_array_equal(engine.placement.physical_to_logical, first.physical_to_logical)
    experts = engine.state["moe_layers"]["blocks"]["ffn"]["experts"]
    assert experts["w_up"].shape[1] == 8 + R  # the slots' copies are stored
    engine.set_placement(second)  # compiles the copy from slots to slots
    completions = engine.generate(prompts, PARAMS)  # compiles the steps
    planned = len(calls)
    with CompileCounter() as compiles:  # new placements every 2 steps: values change, not shapes
        again = engine.generate(prompts, PARAMS)
    assert compiles.count == 0 and len(calls) > planned > 0
    assert_model_outputs(prompts, completions)
    assert [c.output_ids for c in again] == [c.output_ids for c in completions]
    # the planner saw the loads counted since the previous plan, with the engine's R and devices
    assert len(calls) >= 2 and all(r == R and d == DEVICES for _, r, d in calls)
    assert (
        calls[0][0].shape == (2, 8)
        and sum(load for load, _, _ in calls).sum() <= engine.expert_load().load.sum()
    )
    planned = planner(calls[-1][0], replicas=R, devices=DEVICES)
    np.testing.assert_array_equal(engine.placement.physical_to_logical, planned.physical_to_logical)
    # the stored copies are the logical weights gathered by the placement
    w_up = np.asarray(params["moe_layers"]["blocks"]["ffn"]["experts"]["w_up"])
    stored = np.asarray(engine.state["moe_layers"]["blocks"]["ffn"]["experts"]["w_up"])
    np.testing.assert_array_equal(
        stored, np.take_along_axis(w_up, planned.physical_to_logical[..., None, None], 1)
    )
    engine.load_weights(params, biases)  # logical parameters, copied onto the slots again
    np.testing.assert_array_equal(engine.state["moe_layers"]["blocks"]["ffn"]["experts"]["w_up"], stored)


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
