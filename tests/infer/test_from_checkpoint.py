"""Engine.from_checkpoint: a training run's parameters, config and tokenizer; greedy text
generation equals a naive greedy loop of full-sequence forwards of the restored model."""

import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.data.tokenizer import byte_tokenizer
from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.runtime.restore import restore_params
from frontier_jax.train.loop import train
from tests.model.common import jit
from tests.train.common import tiny_config

pytestmark = pytest.mark.slow  # long: excluded from the default run (pyproject addopts)

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("infer_run") / "run"
    train(
        tiny_config("train.steps=2", "checkpoint.every=2", "checkpoint.async_save=false"),
        run_dir,
        progress=False,
    )
    return run_dir


def naive_greedy(model, ids: list[int], steps: int) -> list[int]:
    forward = jit(lambda m, x: m(x))
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(np.argmax(np.asarray(forward(model, jnp.asarray([ids], jnp.int32)))[0, -1])))
    return ids[-steps:]


def test_from_checkpoint_generates_the_restored_models_greedy_text(run_dir):
    engine = Engine.from_checkpoint(str(run_dir), infer={"max_len": 64})
    prompt = "def f(x):"
    completion = engine.generate([prompt], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))[0]
    tokenizer = byte_tokenizer()
    assert completion.prompt_ids == tokenizer.encode(prompt)
    reference = naive_greedy(restore_params(run_dir).model(), completion.prompt_ids, NEW_TOKENS)
    assert completion.output_ids == reference
    assert completion.text == tokenizer.decode(reference)


def test_from_checkpoint_without_checkpoints_names_the_directory(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint in"):
        Engine.from_checkpoint(str(tmp_path))
