"""The `model` reward: a scalar-head checkpoint (1 step of the value-regression objective from the
reference LM run) scores prompt + completion rendered as a chat, on an 8-device mesh exactly as on
one device and as the float64 reference model reads it at the rendering's last token; a
checkpoint with an LM head is one error line."""

import json

import jax
import numpy as np
import pytest

from frontier_jax.data.template import render_chat
from frontier_jax.data.tokenizer import byte_tokenizer
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.mesh import build_mesh
from frontier_jax.posttrain.rewards import RewardsConfig, RewardSet
from frontier_jax.runtime.program import build_model_program
from frontier_jax.train.loop import train
from tests.model import reference as ref

from .test_objectives_and_init_from import RandomRows, ValueRegression, _cfg, _merge

PROMPTS = ["2+3=", "What is 7*6?", "x", "Name a prime."]
COMPLETIONS = ["<answer>5</answer>", "42", "a longer completion that pads the others", ""]


@pytest.fixture(scope="module")
def reward_run(reference_run, tmp_path_factory):
    cfg = _cfg(str(reference_run), "train.steps=1", "checkpoint.async_save=false")
    run_dir = tmp_path_factory.mktemp("reward_model") / "run"
    train(
        cfg,
        run_dir,
        objective=ValueRegression(build_model_program(cfg)),
        batches=RandomRows(cfg.model.vocab_size),
        progress=False,
    )
    return run_dir, cfg


def test_model_reward_on_8_devices_equals_one_device_and_the_float64_reference(reward_run):
    run_dir, cfg = reward_run
    one = build_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    scores = {}
    for name, mesh in (("eight", {"data": 8}), ("one", one)):
        config = RewardsConfig.from_dict(
            {
                "functions": [{"name": "model", "checkpoint": str(run_dir), "mesh": mesh, "batch_rows": 8}],
                "timeout_s": 600,
            }
        )
        with RewardSet(config) as rewards:
            scores[name] = rewards.score(PROMPTS, COMPLETIONS).by_function["model"]
            program = rewards.functions["model"].program
            assert program.mesh.size == (8 if name == "eight" else 1)
    np.testing.assert_allclose(scores["eight"], scores["one"], rtol=1e-5, atol=1e-6)

    from frontier_jax.runtime.restore import restore_params

    restored = restore_params(run_dir)
    f64 = jax.tree.map(lambda a: np.asarray(a, np.float64), _merge(restored.params, restored.biases))
    tokenizer = byte_tokenizer()
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ids = render_chat(tokenizer, [("user", p), ("assistant", c)])[0][None, :]
        want, _ = ref.segment_values(f64, ids, cfg.model, np.arange(ids.shape[1])[None], np.ones_like(ids), 1)
        np.testing.assert_allclose(scores["one"][i], want[0, 0], rtol=1e-4, atol=5e-5)


def test_a_model_reward_on_an_lm_checkpoint_is_one_error_line(reference_run):
    with pytest.raises(ValueError) as err:
        RewardSet(
            RewardsConfig.from_dict({"functions": [{"name": "model", "checkpoint": str(reference_run)}]})
        )
    assert "has model.head=lm" in str(err.value) and "\n" not in str(err.value)


def test_describe_grpo_counts_the_arrays_a_grpo_process_holds(reward_run, capsys):
    """`posttrain.memory` against the arrays themselves on 8 devices (data 2 x expert 4): the
    reference a GRPO runner keeps (beta > 0), the latent cache of the rollout engine, the reward
    model as restored; `describe --grpo` prints them and their sum with the trainer's."""
    from frontier_jax.cli import main as cli_main
    from frontier_jax.infer import Engine
    from frontier_jax.posttrain.grpo import rollout_infer
    from frontier_jax.posttrain.memory import grpo_memory
    from frontier_jax.runtime.memory import device_memory
    from frontier_jax.runtime.program import inference_impl, model_program
    from frontier_jax.runtime.restore import restore_params
    from frontier_jax.train.loop import build_runner
    from frontier_jax.train.objectives.grpo import GRPO
    from tests.runtime.test_memory import _device0_bytes

    from .common import tiny_config, tiny_overrides

    run_dir, _ = reward_run
    overrides = ("mesh.data=2", "mesh.expert=4", "train.seq_len=64", "grpo.beta=0.04")
    rewards = f"grpo.rewards=[{{name: math}}, {{name: model, checkpoint: {run_dir}}}]"
    cfg = tiny_config(*overrides, rewards)
    mem = device_memory(model_program(cfg), cfg.train)
    counted = grpo_memory(model_program(cfg), cfg, mem)

    runner = build_runner(cfg, jax.devices(), objective=GRPO(cfg.grpo, cfg.model))
    state = runner.init(0)
    assert counted.reference == _device0_bytes(state.extra["reference"]) > 0
    program = runner.trainer.program
    engine = Engine.from_program(
        program.with_impl(inference_impl(program.cfg.impl)),
        state.params,
        state.biases,
        infer=rollout_infer(cfg.infer, cfg.train),
    )
    assert counted.latent_cache == _device0_bytes(engine.cache) > 0
    from flax import traverse_util

    def buffers(tree) -> dict:  # path -> device 0's buffer of each array
        return {
            path: x.addressable_shards[0].data.unsafe_buffer_pointer()
            for path, x in traverse_util.flatten_dict(tree).items()
        }

    trained = buffers(state.params)
    engine_buffers = buffers(engine.state)
    assert all(engine_buffers[path] == pointer for path, pointer in trained.items())  # no copy
    restored = restore_params(run_dir)
    whole = sum(x.nbytes for x in jax.tree.leaves([restored.params, restored.biases]))
    assert counted.reward_models == {str(run_dir): whole}

    args = ["describe", "--config", "model/toy", "--grpo", "--json", *tiny_overrides(*overrides, rewards)]
    assert cli_main(args) == 0
    info = json.loads(capsys.readouterr().out)["grpo_per_device_bytes"]
    assert info["total_with_trainer"] == mem.total + counted.total
