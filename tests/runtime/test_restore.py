"""Parameters-only restore (frontier_jax/runtime/restore.py).

One 3-step toy training run (the shared tiny config of tests/train, default mesh: data=8)
writes checkpoints at steps 2 and 3.  The reference is the training loop's own full-state
restore (`Checkpointer.restore`, tested by tests/train) of the same step onto one device.
Restored parameters and biases must equal it bitwise on one device and on 8 devices in two
layouts, each array laid out as the rules table says; a bf16 restore equals the fp32 values
cast to bf16 (round to nearest even, as numpy's ml_dtypes does) with the biases kept in fp32.
"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.rules import RULE_SETS, logical_to_spec
from frontier_jax.runtime.restore import restore_params
from frontier_jax.train.loop import train
from tests.train.common import assert_trees_equal, restore_checkpoint, tiny_config

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("restore") / "run"
    cfg = tiny_config(f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.async_save=false")
    train(cfg, run_dir, progress=False)
    return run_dir, cfg


@pytest.fixture(scope="module")
def trained(run):
    """{step: full train state of that checkpoint, on the first device}."""
    run_dir, cfg = run
    return {step: restore_checkpoint(run_dir, step, cfg)[0] for step in (2, STEPS)}


def _assert_laid_out_by_rules(tree: dict, abstract: nnx.State, mesh, rules) -> None:
    variables = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for var, leaf in zip(variables, jax.tree.leaves(tree)):
        expected = NamedSharding(mesh, logical_to_spec(var.get_metadata()["logical_axes"], rules))
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (var.get_metadata(), leaf.sharding)


def test_restores_the_latest_trained_params_on_one_device(run, trained):
    run_dir, cfg = run
    restored = restore_params(run_dir)
    assert restored.step == STEPS
    assert restored.config == {**cfg.to_dict(), "stage": {"index": 0, "start_step": 0, "until_step": STEPS}}
    assert restored.program.cfg.model == cfg.model and restored.program.cfg.mesh == cfg.mesh
    assert_trees_equal(restored.params, trained[STEPS].params, "params")
    assert_trees_equal(restored.biases, trained[STEPS].biases, "biases")
    assert {d for leaf in jax.tree.leaves(restored.params) for d in leaf.devices()} == {jax.devices()[0]}
    # the restored model runs: its logits equal those of the reference state's model
    ids = jnp.arange(16, dtype=jnp.int32)[None] % cfg.model.vocab_size
    reference = restored.program.model(trained[STEPS].params, trained[STEPS].biases)
    np.testing.assert_array_equal(restored.model()(ids), reference(ids))


def test_restores_an_earlier_step_by_number_or_by_its_directory(run, trained):
    run_dir, _ = run
    for restored in (restore_params(run_dir, 2), restore_params(run_dir / "checkpoints" / "2")):
        assert restored.step == 2
        assert_trees_equal(restored.params, trained[2].params, "params")
    assert not np.array_equal(
        trained[2].params["embed"]["embedding"], trained[STEPS].params["embed"]["embedding"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [{"data": 1, "tensor": 2, "expert": 4}, {"data": 1, "fsdp": 8}],
    ids=["tensor2_expert4", "fsdp8"],
)
def test_restores_onto_eight_devices_sharded_by_the_rules(run, trained, layout):
    run_dir, _ = run
    restored = restore_params(run_dir, mesh=MeshConfig(**layout))
    mesh, rules = restored.program.mesh, RULE_SETS["default"]
    assert dict(mesh.shape) == {"stage": 1, "data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **layout}
    _assert_laid_out_by_rules(restored.params, restored.program.abstract_params, mesh, rules)
    _assert_laid_out_by_rules(restored.biases, restored.program.abstract_biases, mesh, rules)
    # really split: some parameter's shards are smaller than the whole array
    assert any(leaf.addressable_shards[0].data.size < leaf.size for leaf in jax.tree.leaves(restored.params))
    assert_trees_equal(restored.params, trained[STEPS].params, "params")
    assert_trees_equal(restored.biases, trained[STEPS].biases, "biases")


@pytest.mark.slow
def test_restores_in_bfloat16_with_float32_biases(run, trained):
    run_dir, _ = run
    restored = restore_params(run_dir, dtype=jnp.bfloat16)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(restored.params), jax.tree.leaves(trained[STEPS].params)
    ):
        assert got.dtype == jnp.bfloat16, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(
            np.asarray(got), np.asarray(want).astype(jnp.bfloat16), err_msg=jax.tree_util.keystr(path)
        )
    assert_trees_equal(restored.biases, trained[STEPS].biases, "biases")  # fp32, unchanged
    # and the bf16 model runs: its logits stay within bf16 weight rounding of the fp32 model's
    # (each weight moves by <= 2^-9 relative; observed max |diff| 0.2% of the logits' range)
    ids = jnp.arange(16, dtype=jnp.int32)[None]
    logits = np.asarray(restored.model()(ids), np.float32)
    reference = np.asarray(restored.program.model(trained[STEPS].params, trained[STEPS].biases)(ids))
    assert np.abs(logits - reference).max() < 0.02 * np.ptp(reference)


def test_a_checkpoint_without_optimizer_state_still_restores_params(run, trained, tmp_path):
    """The same step re-saved with every train-state field except opt_state: the full restore
    of the training loop fails on it, the parameters-only restore reads nothing it lacks."""
    run_dir, cfg = run
    state = trained[STEPS]
    stripped = tmp_path / "stripped" / "checkpoints"
    with ocp.CheckpointManager(stripped) as manager:
        manager.save(
            STEPS,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(
                    {"params": state.params, "biases": state.biases, "step": state.step, "rng": state.rng}
                ),
                config=ocp.args.JsonSave(cfg.to_dict()),
            ),
        )
    shutil.copytree(run_dir / "checkpoints" / str(STEPS) / "data", stripped / str(STEPS) / "data")
    with pytest.raises(Exception, match="opt_state"):
        restore_checkpoint(stripped.parent, STEPS, cfg)
    restored = restore_params(stripped.parent)
    assert_trees_equal(restored.params, state.params, "params")
    assert_trees_equal(restored.biases, state.biases, "biases")


def test_missing_checkpoints_are_named_with_the_steps_that_exist(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(
        ValueError, match=rf"no checkpoint of step 7 in .*checkpoints; its steps: 2, {STEPS}$"
    ):
        restore_params(run_dir, 7)
    with pytest.raises(ValueError, match=rf"no checkpoint in {tmp_path / 'nowhere'}"):
        restore_params(tmp_path / "nowhere")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="no checkpoint in .*empty/checkpoints: it holds no"):
        restore_params(tmp_path / "empty")
