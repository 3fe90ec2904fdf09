"""Checkpoint faults (frontier_jax/train/checkpoint.py), on a small pytree and the real data
iterator: failed saves are reported and leave the previous checkpoint the latest; a latest
checkpoint that does not restore is moved aside and the newest earlier one is used (here with
its checksums removed, as a run written before checksums: orbax's own failures;
test_checkpoint_integrity.py checks the checksums).  And the fast guard of resume's data half:
a restored loop iterator yields the next batch."""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from frontier_jax.config import CheckpointConfig
from frontier_jax.data import DataConfig, build_train_iterator
from frontier_jax.runtime.integrity import MANIFEST
from frontier_jax.train import batches
from frontier_jax.train.checkpoint import Checkpointer, CheckpointError

from .common import tiny_config

CONFIG = {"model": {"hidden_size": 8}}


def _iterator():
    return build_train_iterator(DataConfig(), seq_len=16, global_batch=2)


def _state(step: int) -> dict:
    return {
        "w": jnp.full((4, 8), float(step)),
        "noise": jax.random.normal(jax.random.key(step), (64, 256)),  # incompressible: stored as is
        "step": jnp.int32(step),
        "pair": (jnp.ones(3), jnp.zeros(2)),
    }


def _abstract():
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _state(0))


def _saved_run(directory, steps=(1, 2, 3), async_save=True) -> list[dict]:
    """Checkpoints of `steps`, each after one more batch; the iterator states saved."""
    checkpointer = Checkpointer(directory, CheckpointConfig(keep=10, async_save=async_save))
    data, states = _iterator(), []
    for step in steps:
        next(data)
        checkpointer.save(step, _state(step), data, CONFIG)
        states.append(data.get_state())
    checkpointer.close()
    return states


def _restore_latest(directory):
    checkpointer = Checkpointer(directory, CheckpointConfig())
    data = _iterator()
    try:
        found = checkpointer.restore_latest(_abstract(), lambda step: data, lambda step, saved: None)
    finally:
        checkpointer.close()
    return found, data.get_state()


def _raised_within(seconds: float, fn) -> BaseException | None:
    """What `fn()` raised (None if it returned), run in a daemon thread: fails the test instead of
    hanging it when `fn` does not return within `seconds`."""
    outcome = {}

    def target():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            outcome["err"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a hang)"
    return outcome.get("err")


def _truncate_state_files(step_dir):
    for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _flip_a_byte_of_state_files(step_dir):
    for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
        raw = bytearray(open(path, "rb").read())
        raw[len(raw) // 2] ^= 0xFF
        open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate_state_files, "unreadable"),
        (_flip_a_byte_of_state_files, "unreadable"),
        (lambda d: os.remove(d / "state" / "_METADATA"), "missing-METADATA"),
        (lambda d: (d / "data" / "process_0-of-1.json").write_text("{oops"), "unreadable"),
    ],
)
def test_a_latest_checkpoint_that_does_not_restore_is_moved_aside_and_the_previous_one_used(
    tmp_path, caplog, damage, reason
):
    iterator_states = _saved_run(tmp_path)
    for manifest in glob.glob(f"{tmp_path}/*/{MANIFEST}"):
        os.remove(manifest)
    damage(tmp_path / "3")
    (step, state), data_state = _restore_latest(tmp_path)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 8), 2.0))
    assert data_state == iterator_states[1]  # the data position of step 2, not 3
    assert sorted(os.listdir(tmp_path)) == ["1", "2", f"3.corrupt-{reason}"]  # kept, not deleted
    warning = next(
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "checkpoint 3" in r.getMessage()
    )
    assert f"moved to {tmp_path}/3.corrupt-{reason}; resuming from step 2" in warning
    if reason == "missing-METADATA":
        assert f"{tmp_path}/3/state/_METADATA is missing" in warning
    assert Checkpointer(tmp_path, CheckpointConfig()).latest_step() == 2  # a resumed run saves 3 anew


def test_every_newer_checkpoint_that_does_not_restore_is_moved_aside(tmp_path, caplog):
    """Steps 3 and 2 damaged (two ways): step 1 is restored and both are moved aside, each with
    its own reason and warning, so that a resumed run's checkpoints 2 and 3 are new."""
    iterator_states = _saved_run(tmp_path)
    for manifest in glob.glob(f"{tmp_path}/*/{MANIFEST}"):  # orbax's own failures (module docstring)
        os.remove(manifest)
    _truncate_state_files(tmp_path / "3")
    os.remove(tmp_path / "2" / "state" / "_METADATA")
    (step, state), data_state = _restore_latest(tmp_path)
    assert step == 1 and data_state == iterator_states[0]
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 8), 1.0))
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt-missing-METADATA", "3.corrupt-unreadable"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for bad, reason in [(3, "unreadable"), (2, "missing-METADATA")]:
        assert any(f"moved to {tmp_path}/{bad}.corrupt-{reason}; resuming from step 1" in w for w in warnings)
    assert Checkpointer(tmp_path, CheckpointConfig()).latest_step() == 1


def test_no_checkpoint_that_restores_is_one_error_and_nothing_is_moved(tmp_path):
    _saved_run(tmp_path, steps=(1, 2))
    for step in ("1", "2"):
        _truncate_state_files(tmp_path / step)  # named by their checksums
    with pytest.raises(CheckpointError, match=rf"no checkpoint in {tmp_path} restores; the latest, step 2: "):
        _restore_latest(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_a_rejected_config_stops_the_search_without_moving_anything(tmp_path):
    _saved_run(tmp_path, steps=(1, 2))
    checkpointer = Checkpointer(tmp_path, CheckpointConfig())

    def refuse(step, saved):
        raise ValueError(f"step {step}: different model: {saved['model']}")

    with pytest.raises(ValueError, match="step 2: different model"):
        checkpointer.restore_latest(_abstract(), lambda step: _iterator(), refuse)
    checkpointer.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_save_into_a_directory_that_cannot_be_written_fails_at_once(tmp_path):
    """Orbax would wait for ever for the step directory its helper thread failed to create."""
    directory = tmp_path / "ckpt"
    checkpointer = Checkpointer(directory, CheckpointConfig(keep=10))
    data = _iterator()
    checkpointer.save(1, _state(1), data, CONFIG)
    checkpointer.wait()
    shutil.move(directory, tmp_path / "moved")
    directory.write_text("a file where the directory was")  # not writable, even for root
    err = _raised_within(20, lambda: checkpointer.save(2, _state(2), data, CONFIG))
    assert isinstance(err, CheckpointError), err
    assert re.match(rf"saving checkpoint 2 in {directory} failed \(.*Not a directory", str(err)), str(err)


def test_a_save_failing_in_the_background_is_reported_by_the_next_poll(tmp_path, monkeypatch):
    """A full disk while orbax writes in its background thread: `poll` (called every step)
    raises CheckpointError naming the directory; the previous checkpoint stays the latest."""
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep=10, async_save=True))
    data = _iterator()
    checkpointer.save(1, _state(1), data, CONFIG)
    checkpointer.wait()

    async def disk_full(self, item, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full)
    checkpointer.save(2, _state(2), data, CONFIG)
    deadline = time.monotonic() + 30
    with pytest.raises(
        CheckpointError,
        match=rf"saving checkpoint 2 in {tmp_path} failed \(.*No space left.*"
        r"the latest checkpoint is still 1",
    ):
        while time.monotonic() < deadline:
            checkpointer.poll()
            time.sleep(0.05)
    assert Checkpointer(tmp_path, CheckpointConfig()).latest_step() == 1
    checkpointer.close()


BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@pytest.mark.parametrize("ramp", [False, True], ids=["fixed_batch", "mid_batch_ramp"])
def test_checkpoint_restores_the_loop_data_iterator_to_the_next_batch(tmp_path, ramp):
    """The fast guard of resume's data half (the slow end-to-end resume tests train): a
    checkpoint taken after 3 batches, restored into a fresh loop iterator, gives batches 4, 5."""
    cfg = tiny_config(
        *(["train.batch_ramp_steps=6", "train.batch_ramp_start=2", "train.micro_batches=2"] if ramp else [])
    )
    data = batches.data_iterator(cfg)
    for _ in range(3):
        next(data)
    saver = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    saver.save(3, _state(3), data, cfg.to_dict())
    saver.close()
    want = [next(data) for _ in range(2)]

    fresh = batches.data_iterator(cfg)
    saver = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    restored = saver.restore(3, _abstract(), fresh)
    saver.close()
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((4, 8), 3.0))
    for k, batch in enumerate(want):
        got = next(fresh)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], batch[key], err_msg=f"batch {3 + k} {key}")


def test_resume_compares_the_architecture_not_the_implementation(tmp_path):
    """check_same_model: the `impl:` section and model.name may change on resume; any
    architecture field may not, and the error names it with both values."""
    import json

    from frontier_jax.config import load_config
    from frontier_jax.train.checkpoint import check_same_model

    saved = json.loads(json.dumps(load_config("model/toy").to_dict()))  # as the checkpoint stores it
    other_impl = load_config(
        "model/toy",
        [
            "impl.remat=full",
            "impl.attention=cudnn",
            "precision.policy=bf16",
            "impl.gmm=pallas",
            "impl.moe_dispatch=capacity",
            "impl.ep_overlap_chunks=2",
            "model.name=renamed",
        ],
    )
    check_same_model(saved, other_impl.to_dict(), tmp_path)
    deeper = load_config("model/toy", ["model.num_layers=4", "model.scoring_func=softmax"])
    with pytest.raises(
        ValueError,
        match=r"holds a different model:\n  model\.num_layers: checkpoint 3 vs "
        r"config 4\n  model\.scoring_func: checkpoint 'sigmoid' vs config "
        r"'softmax'\n",
    ):
        check_same_model(saved, deeper.to_dict(), tmp_path)
