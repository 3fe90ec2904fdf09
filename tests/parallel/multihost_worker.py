"""One process of the multi-process tests (`test_multihost.py`).

    python multihost_worker.py MODE RUN_DIR PROCESS_ID NUM_PROCESSES PORT [key=value ...]

Joins the other processes through `jax.distributed` (coordinator on 127.0.0.1:PORT; CPU
cross-process collectives through gloo, this jax's default, set explicitly) with this process's
fake CPU devices (XLA_FLAGS sets how many); NUM_PROCESSES=1 skips `jax.distributed` (the
single-process reference).  The config is `model/toy` with the given dotted overrides.
  train      runs `frontier_jax.train.loop.train(cfg, RUN_DIR)`
  preempt    the same, for a run stopped by a signal: prints the `Preempted` message and exits 75
  mesh       builds the mesh of `cfg.mesh` and prints, as one JSON line, the mesh coordinates of
             this process's devices ({"process": i, "coords": [{axis: index}, ...]})
  batch      for each layout (a list of overrides) in RUN_DIR/layouts.json, assembles the loop's
             first global batch on that mesh and writes every addressable shard (its row and
             column start, and its values) to RUN_DIR/batch_<layout>_<process>.npz
  data_save  takes RUN_DIR/steps.txt batches from the loop's data iterator and saves the
             iterator with the loop's Checkpointer in RUN_DIR/checkpoints at that step
  data_next  restores the latest checkpoint of RUN_DIR/checkpoints into a fresh data iterator
             and writes its next batch to RUN_DIR/next_<process>.npz
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np


def _batch_shards(cfg, run_dir: Path, layout: int) -> None:
    from frontier_jax.parallel.mesh import batch_sharding, build_mesh
    from frontier_jax.parallel.rules import RULE_SETS
    from frontier_jax.train import batches, loop

    sharding = batch_sharding(build_mesh(cfg.mesh), RULE_SETS[cfg.mesh.rules])
    batch = loop.device_batch(next(batches.data_iterator(cfg)), sharding)
    out = {}
    for key, array in batch.items():
        out[f"{key}_shape"] = np.asarray(array.shape)
        for n, shard in enumerate(array.addressable_shards):
            out[f"{key}_{n}_start"] = np.asarray([s.start or 0 for s in shard.index])
            out[f"{key}_{n}_value"] = np.asarray(shard.data)
    np.savez(run_dir / f"batch_{layout}_{jax.process_index()}.npz", **out)


def _replicated_state():
    """A tiny train-state stand-in, replicated over every device of every process."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())
    return {"step": jax.make_array_from_callback((), sharding, lambda _: np.int32(7))}


def save_data(cfg, run_dir: Path, steps: int) -> None:
    """Takes `steps` batches from a fresh loop data iterator and saves it, with a stand-in
    state, through the loop's Checkpointer in run_dir/checkpoints at step `steps`."""
    from frontier_jax.config import CheckpointConfig
    from frontier_jax.train.batches import data_iterator
    from frontier_jax.train.checkpoint import Checkpointer

    data = data_iterator(cfg)
    for _ in range(steps):
        next(data)
    saver = Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
    saver.save(steps, _replicated_state(), data, cfg.to_dict())
    saver.close()


def restore_data(cfg, run_dir: Path):
    """A fresh loop data iterator moved to the latest checkpoint of run_dir/checkpoints (restored
    with the stand-in state through the loop's Checkpointer)."""
    from frontier_jax.config import CheckpointConfig
    from frontier_jax.train.batches import data_iterator
    from frontier_jax.train.checkpoint import Checkpointer, abstract_with_shardings

    data, state = data_iterator(cfg), _replicated_state()
    abstract = abstract_with_shardings(
        jax.eval_shape(lambda: state), jax.tree.map(lambda x: x.sharding, state)
    )
    saver = Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
    restored = saver.restore(saver.latest_step(), abstract, data)
    saver.close()
    assert int(restored["step"]) == 7
    return data


def main(
    mode: str, run_dir: str, process_id: int, num_processes: int, port: int, overrides: list[str]
) -> None:
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=60,
        )
    from frontier_jax.config import load_config

    cfg = load_config("model/toy", overrides)
    run_dir = Path(run_dir)
    code = 0
    if mode == "preempt":
        from frontier_jax.train.loop import train
        from frontier_jax.train.signals import EXIT_PREEMPTED, Preempted

        try:
            train(cfg, run_dir, progress=False)
        except Preempted as err:
            print(f"process {jax.process_index()}: {err}", flush=True)
            code = EXIT_PREEMPTED
    elif mode == "train":
        from frontier_jax.train.loop import train

        train(cfg, run_dir, progress=False)
        print(
            f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} devices, done",
            flush=True,
        )
    elif mode == "mesh":
        from frontier_jax.parallel.mesh import build_mesh

        mesh = build_mesh(cfg.mesh)
        coords = [
            dict(zip(mesh.axis_names, map(int, index)))
            for index, device in np.ndenumerate(mesh.devices)
            if device.process_index == jax.process_index()
        ]
        print(json.dumps({"process": jax.process_index(), "coords": coords}), flush=True)
    elif mode == "batch":
        for n, layout in enumerate(json.loads((run_dir / "layouts.json").read_text())):
            _batch_shards(load_config("model/toy", overrides + layout), run_dir, n)
    elif mode == "data_save":
        save_data(cfg, run_dir, int((run_dir / "steps.txt").read_text()))
    elif mode == "data_next":
        np.savez(run_dir / f"next_{jax.process_index()}.npz", **next(restore_data(cfg, run_dir)))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if num_processes > 1:
        jax.distributed.shutdown()
    raise SystemExit(code)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
