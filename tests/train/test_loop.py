"""The loop's input side (`frontier_jax/train/loop.py`): the data iterator it builds and the
global batch it assembles, checked without compiling a train step."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from frontier_jax.data import build_train_iterator
from frontier_jax.parallel.mesh import build_mesh
from frontier_jax.train import batches, loop
from frontier_jax.train.optimizer import batch_size_at

from .common import tiny_config

KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def test_batch_ramp_reads_only_the_rows_it_trains_on():
    """Batch k holds the ramp's rows at step k, read in order from the row stream that a
    fixed-size iterator of the same config walks through, then padding rows.  Before: every
    step read a full global batch and the step masked the rows beyond the ramp (never trained)."""
    cfg = tiny_config("train.batch_ramp_steps=6", "train.batch_ramp_start=2", "train.micro_batches=2")
    ramp = [batch_size_at(cfg.train, step) for step in range(8)]
    assert ramp[0] == 2 and ramp[-1] == 8 and len(set(ramp)) > 2  # a real ramp
    fixed = build_train_iterator(cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch)
    full_batches = [next(fixed) for _ in range(8)]
    stream = {k: np.concatenate([b[k] for b in full_batches]) for k in KEYS}
    data, read = batches.data_iterator(cfg), 0
    for step, rows in enumerate(ramp):
        batch = next(data)
        assert batch["input_ids"].shape == (8, 32)
        assert int(batch["segment_ids"].any(axis=1).sum()) == rows, step
        assert not batch["loss_mask"][rows:].any(), step
        for key in KEYS:
            np.testing.assert_array_equal(
                batch[key][:rows], stream[key][read : read + rows], err_msg=f"{step} {key}"
            )
        read += rows
    assert read == sum(ramp)


def test_global_batch_puts_each_block_on_its_device():
    """8 devices as data 2 x fsdp 2 x tensor 2: rows split 4 ways, replicated over tensor."""
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    sharding = NamedSharding(build_mesh(cfg.mesh), PartitionSpec(("data", "fsdp")))
    host = next(batches.data_iterator(cfg))
    batch = loop.device_batch(host, sharding)
    for key in KEYS:
        assert batch[key].shape == host[key].shape and batch[key].sharding == sharding
        for shard in batch[key].addressable_shards:
            assert shard.data.shape == (2, 32)
            np.testing.assert_array_equal(np.asarray(shard.data), host[key][shard.index], err_msg=key)
        np.testing.assert_array_equal(np.asarray(jax.device_get(batch[key])), host[key], err_msg=key)
