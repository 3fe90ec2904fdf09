"""The `model` reward: a scalar-head checkpoint (1 step of the value-regression objective from the
reference LM run) scores prompt + completion rendered as a chat, on an 8-device mesh exactly as on
one device and as the float64 reference model reads it at the rendering's last token; a
checkpoint with an LM head is one error line."""

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
