"""Parameters-only restore (frontier_jax/runtime/restore.py).

One 3-step toy training run (the shared tiny config of tests/train, default mesh: data=8, the
byte tokenizer read from a tokenizer.json file) writes checkpoints at steps 2 and 3.  The reference is the training loop's own full-state
restore (`Checkpointer.restore`, tested by tests/train) of the same step onto one device.
Restored parameters and biases must equal it bitwise on one device and on 8 devices in two
layouts, each array laid out as the rules table says; a bf16 restore equals the fp32 values
cast to bf16 (round to nearest even, as numpy's ml_dtypes does) with the biases kept in fp32.
A damaged or mismatched checkpoint, or a tokenizer.json changed since training, is one error
line in `restore_params`, `eval` and `generate` (exit 5 / 2), naming the file and what to load.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from frontier_jax import cli
from frontier_jax.data.tokenizer import byte_tokenizer, load_tokenizer, run_tokenizer, tokenizer_identity
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.rules import RULE_SETS, logical_to_spec
from frontier_jax.runtime.integrity import MANIFEST, CheckpointError
from frontier_jax.runtime.restore import restore_params
from frontier_jax.train.loop import train
from tests.train.common import assert_trees_equal, restore_checkpoint, run_python, tiny_config

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("restore")
    tokenizer_file = root / "tokenizer.json"
    tokenizer_file.write_text(byte_tokenizer().to_str())
    run_dir = root / "run"
    cfg = tiny_config(
        f"train.steps={STEPS}",
        "checkpoint.every=2",
        "checkpoint.async_save=false",
        f"data.tokenizer={tokenizer_file}",
    )
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
    assert restored.config == {
        **cfg.to_dict(),
        "stage": {"index": 0, "start_step": 0, "until_step": STEPS},
        "tokenizer": tokenizer_identity(load_tokenizer(cfg.data.tokenizer)),
    }
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


# ------------------------------------------------------------------ damaged checkpoints, one line
def _copy(run_dir, tmp_path, checksums: bool = True):
    """A copy of the run's checkpoints (without their checksums: a run written before them)."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    if not checksums:
        for step in (2, STEPS):
            (copy / "checkpoints" / str(step) / MANIFEST).unlink(missing_ok=True)
    return copy


def _state_data_file(step_dir) -> str:
    path = max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)
    return os.path.relpath(path, step_dir)


def _cli_error(capsys, argv: list[str], code: int) -> str:
    """The one stderr line of the eval / generate command `argv` (warnings aside), which exits `code`."""
    assert cli.main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _eval_and_generate(path, tmp_path) -> list[list[str]]:
    return [
        ["eval", "--checkpoint", str(path), "--out", str(tmp_path / "eval")],
        ["generate", "--checkpoint", str(path), "--prompt", "1 + 1 =", "--max-new-tokens", "2"],
    ]


def test_a_bit_flip_is_one_error_naming_the_file_and_the_step_to_load(run, tmp_path, capsys):
    """One flipped bit in the middle of the latest step's array data: restore_params, eval and
    generate used to carry on with other weights (exit 0)."""
    run_dir, _ = run
    copy = _copy(run_dir, tmp_path)
    checkpoints = copy / "checkpoints"
    name = _state_data_file(checkpoints / str(STEPS))
    raw = bytearray((checkpoints / str(STEPS) / name).read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (checkpoints / str(STEPS) / name).write_bytes(bytes(raw))
    want = (
        f"checkpoint {STEPS} in {checkpoints} is corrupt: {name} does not match its sha256 in "
        f"checksums.json (.*); steps whose checksums verify: 2; load {checkpoints}/2 instead$"
    )
    with pytest.raises(CheckpointError, match=want):
        restore_params(copy)
    for argv in _eval_and_generate(copy, tmp_path):
        assert re.match("error: " + want, _cli_error(capsys, argv, 5)), argv
    assert restore_params(copy, 2).step == 2  # the step it names restores
    assert sorted(os.listdir(checkpoints)) == ["2", str(STEPS)]  # nothing moved


def test_a_truncated_checkpoint_is_one_error_line_in_eval_and_generate(run, tmp_path, capsys):
    """Written before checksums (so orbax reads the cut file): eval used to print 600 lines with
    44 tracebacks, generate 140, without an error: line."""
    run_dir, _ = run
    copy = _copy(run_dir, tmp_path, checksums=False)
    checkpoints = copy / "checkpoints"
    for path in glob.glob(f"{checkpoints}/{STEPS}/state/**/d/*", recursive=True):
        with open(path, "r+b") as f:
            f.truncate(100)
    for argv in _eval_and_generate(copy, tmp_path):
        err = _cli_error(capsys, argv, 5)
        assert err.startswith(
            f"error: checkpoint {STEPS} in {checkpoints} does not restore (its state does not"
        ), err
        assert err.endswith(f"steps without checksums (not verified): 2; try {checkpoints}/2"), err


def test_a_checkpoint_holding_another_models_config_is_one_error_line(run, tmp_path, capsys):
    """config/metadata of the latest step replaced by another model's: orbax's "set strict=False"
    advice in 669 lines before; now the checksums name the file, and in a run written before
    checksums the error says the state does not match the config."""
    run_dir, cfg = run
    for checksums, problem in (
        (True, "is corrupt: config/metadata "),  # its size or digest
        (False, "does not restore (its state does not read as the model of its config: "),
    ):
        copy = _copy(run_dir, tmp_path / str(checksums), checksums=checksums)
        checkpoints = copy / "checkpoints"
        other = {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "hidden_size": 48}}
        (checkpoints / str(STEPS) / "config" / "metadata").write_text(json.dumps(other))
        with pytest.raises(
            CheckpointError, match=f"checkpoint {STEPS} in {checkpoints} {re.escape(problem)}"
        ):
            restore_params(copy)
        err = _cli_error(capsys, _eval_and_generate(copy, tmp_path)[0], 5)
        assert err.startswith(f"error: checkpoint {STEPS} in {checkpoints} {problem}"), err
        assert f"{checkpoints}/2" in err and "strict=False" not in err  # what to do, not orbax's advice


def test_a_tokenizer_changed_since_training_is_refused_naming_both_hashes(run, tmp_path, capsys):
    """tokenizer.json overwritten at the same path after training (here: one more added token):
    eval (CE 7.60 instead of 2.9), generate and resume all used to carry on."""
    run_dir, cfg = run
    tokenizer_file = Path(cfg.data.tokenizer)
    trained = tokenizer_file.read_text()
    recorded = tokenizer_identity(load_tokenizer(str(tokenizer_file)))["sha256"]
    changed = json.loads(trained)
    changed["added_tokens"].append({**changed["added_tokens"][-1], "id": 266, "content": "<|new|>"})
    try:
        tokenizer_file.write_text(json.dumps(changed))
        now = tokenizer_identity(load_tokenizer(str(tokenizer_file)))["sha256"]
        assert now != recorded
        want = (
            f"checkpoint {STEPS} in {run_dir / 'checkpoints'} was trained with another tokenizer "
            f"(data.tokenizer='{tokenizer_file}', 266 ids, sha256 {recorded[:12]}...) than this config's "
            f"data.tokenizer='{tokenizer_file}' (267 ids, sha256 {now[:12]}...; data.special_tokens count)"
        )
        with pytest.raises(ValueError, match=re.escape(want)):
            _tokenizer_of(restore_params(run_dir))
        for argv in _eval_and_generate(run_dir, tmp_path):
            assert _cli_error(capsys, argv, 2).startswith("error: " + want), argv
        resumed = tmp_path / "resumed"
        shutil.copytree(run_dir / "checkpoints", resumed / "checkpoints")
        with pytest.raises(ValueError, match=re.escape(want.replace(str(run_dir), str(resumed)))):
            train(cfg, resumed, progress=False)
    finally:
        tokenizer_file.write_text(trained)
    _tokenizer_of(restore_params(run_dir))  # the trained content back: accepted again


def _tokenizer_of(restored):
    return run_tokenizer(restored.config, restored.trained())


CTRL_C_SCRIPT = """
import asyncio, os, signal, sys
from orbax.checkpoint._src.serialization import serialization
from frontier_jax import cli

# Ctrl-C as a terminal delivers it: a pytest worker may pass SIGINT on ignored (an earlier test in
# the same worker left it so), and a child started with SIGINT ignored keeps ignoring it
signal.signal(signal.SIGINT, signal.default_int_handler)

read = serialization._read_shard
async def read_after_ctrl_c(*args, **kwargs):  # Ctrl-C arrives while orbax reads the arrays
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.2)
    return await read(*args, **kwargs)
serialization._read_shard = read_after_ctrl_c
sys.exit(cli.main(["generate", "--checkpoint", {run!r}, "--prompt", "1 + 1 =", "--max-new-tokens", "2"]))
"""


def test_ctrl_c_during_a_restore_is_one_line_and_exit_130(run):
    """It used to end in 56 lines of tracebacks (orbax wraps the KeyboardInterrupt in its own
    error, so it must not be taken for a corrupt checkpoint either)."""
    run_dir, _ = run
    proc = run_python(CTRL_C_SCRIPT.format(run=str(run_dir)), devices=None, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING")]
    assert proc.returncode == 130 and lines == ["interrupted: stopped by Ctrl-C (SIGINT)"], proc.stderr[
        -3000:
    ]
