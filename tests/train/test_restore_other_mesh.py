"""A checkpoint written on 8 devices restores onto 1 device and training continues
(frontier_jax/train/checkpoint.py restores onto the *current* shardings).

Two 8-device checkpoints of step N of the shared reference run (conftest.py `reference_run`,
trained on the default mesh data=8, parameters replicated) are resumed in a child process that
has a single CPU device:
  * the reference's own checkpoint (written by train() on mesh data=8);
  * the same state re-laid-out on mesh fsdp=8 (every [.., embed, ..] weight and its AdamW
    moments split in 8 shards) and saved from there, so restoring it gathers real shards.
Restored states must equal the saved ones bitwise.  The resumed 1-device losses equal the
uninterrupted 8-device run's up to fp32 reduction order: rtol 1e-5 on losses and grad norms
(observed <= 1.5e-7); final parameters and AdamW moments atol 1e-6 (observed <= 1.2e-7);
expert biases within one +-gamma flip per step (observed identical: a flip needs a routing
near-tie); and both resumes give bitwise the same metrics (same program, state and data).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from frontier_jax.config import CheckpointConfig
from frontier_jax.data import build_train_iterator
from frontier_jax.parallel.mesh import build_mesh
from frontier_jax.train import loop
from frontier_jax.train.checkpoint import Checkpointer
from frontier_jax.train.step import Trainer

from .common import REF_EVERY, computed_metrics, read_metrics, restore_checkpoint, run_python, tiny_config

N = REF_EVERY
pytestmark = pytest.mark.slow  # a child process that compiles the 1-device train step

CHILD = """
import json, sys
from pathlib import Path
import jax, numpy as np
assert jax.device_count() == 1, jax.devices()
from frontier_jax.train.loop import train
from tests.train.common import restore_checkpoint, tiny_config

root, n = Path({root!r}), {n}
for name in ("from_data8", "from_fsdp8"):
    run = root / name
    state, _ = restore_checkpoint(run, n, tiny_config())
    flat = {{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}}
    np.savez(root / (name + "_restored.npz"), **flat)
    history = train(tiny_config(f"train.steps={{2 * n}}", f"checkpoint.every={{n}}"), run, progress=False)
    print(name, "resumed", [r["step"] for r in history])
"""


def _flat(state) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
        for p, x in jax.tree_util.tree_leaves_with_path(state)
    }


@pytest.fixture(scope="module")
def resumed_on_one_device(reference_run, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("other_mesh")
    shutil.copytree(reference_run / "checkpoints" / str(N), root / "from_data8" / "checkpoints" / str(N))

    # the same checkpoint, re-laid-out FSDP-style over the 8 devices and saved from there
    cfg = tiny_config("mesh.data=1", "mesh.fsdp=8")
    mesh = build_mesh(cfg.mesh)
    trainer = Trainer(cfg)
    state_shardings = getattr(loop, "train_state_shardings", None) or loop._state_shardings
    shardings = state_shardings(trainer, mesh)
    state, data_state = restore_checkpoint(reference_run, N, cfg, shardings)
    embedding = state.params["embed"]["embedding"]
    assert "fsdp" in str(embedding.sharding.spec)
    assert {s.data.shape for s in embedding.addressable_shards} == {(264, 32 // 8)}  # really split in 8
    data = build_train_iterator(cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch)
    data.set_state(data_state)
    checkpointer = Checkpointer(root / "from_fsdp8" / "checkpoints", CheckpointConfig(async_save=False))
    checkpointer.save(N, state, data, cfg.to_dict())
    checkpointer.close()

    proc = run_python(CHILD.format(root=str(root), n=N), devices=1, timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    for name in ("from_data8", "from_fsdp8"):
        assert f"{name} resumed {list(range(N + 1, 2 * N + 1))}" in proc.stdout, proc.stdout
    return root


def test_restored_state_on_one_device_equals_the_saved_one(reference_run, resumed_on_one_device):
    saved = _flat(restore_checkpoint(reference_run, N, tiny_config())[0])
    for name in ("from_data8", "from_fsdp8"):
        restored = dict(np.load(resumed_on_one_device / f"{name}_restored.npz"))
        assert restored.keys() == saved.keys()
        for key, value in saved.items():
            assert restored[key].dtype == value.dtype, (name, key)
            np.testing.assert_array_equal(restored[key], value, err_msg=f"{name} {key}")


def test_one_device_resume_matches_the_eight_device_run(reference_run, resumed_on_one_device):
    reference = {r["step"]: r for r in read_metrics(reference_run)}
    runs = {name: read_metrics(resumed_on_one_device / name) for name in ("from_data8", "from_fsdp8")}
    for name, records in runs.items():
        assert [r["step"] for r in records] == list(range(N + 1, 2 * N + 1)), name
        for r in records:
            ref = reference[r["step"]]
            for key in ("loss", "ce_loss", "mtp_loss", "z_loss", "balance_loss", "grad_norm"):
                np.testing.assert_allclose(
                    r[key], ref[key], rtol=1e-5, err_msg=f"{name} step {r['step']} {key}"
                )
            for key in ("lr", "tokens", "batch_rows", "finite"):
                assert r[key] == ref[key], (name, r["step"], key)
    # the two 1-device resumes ran the same program on the same state and data
    assert [computed_metrics(r) for r in runs["from_data8"]] == [
        computed_metrics(r) for r in runs["from_fsdp8"]
    ]

    gamma = tiny_config().train.bias_update_speed
    final_ref = _flat(restore_checkpoint(reference_run, 2 * N, tiny_config())[0])
    for name in runs:
        final = _flat(restore_checkpoint(resumed_on_one_device / name, 2 * N, tiny_config())[0])
        for key, value in final_ref.items():
            if key.startswith((".params", ".opt_state")):
                np.testing.assert_allclose(final[key], value, rtol=0, atol=1e-6, err_msg=f"{name} {key}")
            elif key.startswith(".biases"):
                np.testing.assert_allclose(
                    final[key], value, rtol=0, atol=2 * gamma * N + 1e-7, err_msg=f"{name} {key}"
                )
            else:
                np.testing.assert_array_equal(final[key], value, err_msg=f"{name} {key}")
