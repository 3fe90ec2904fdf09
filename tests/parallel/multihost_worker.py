"""One process of the multi-process tests (`test_multihost.py`).

    python multihost_worker.py {train,mesh} RUN_DIR PROCESS_ID NUM_PROCESSES PORT [key=value ...]

Joins the other processes through `jax.distributed` (coordinator on 127.0.0.1:PORT; CPU
cross-process collectives through gloo, this jax's default, set explicitly) with this process's
fake CPU devices (XLA_FLAGS sets how many); NUM_PROCESSES=1 skips `jax.distributed` (the
single-process reference).  The config is `model/toy` with the given dotted overrides.
  train   runs `frontier_jax.train.loop.train(cfg, RUN_DIR)`
  mesh    builds the mesh of `cfg.mesh` and prints, as one JSON line, the mesh coordinates of
          this process's devices ({"process": i, "coords": [{axis: index}, ...]})
"""

import json
import sys

import jax
import numpy as np


def main(mode: str, run_dir: str, process_id: int, num_processes: int, port: int, overrides: list[str]) -> None:
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=60)
    from frontier_jax.config import load_config

    cfg = load_config("model/toy", overrides)
    if mode == "train":
        from frontier_jax.train.loop import train

        train(cfg, run_dir, progress=False)
        print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
              f"{jax.device_count()} devices, done", flush=True)
    else:
        from frontier_jax.parallel.mesh import build_mesh

        mesh = build_mesh(cfg.mesh)
        coords = [dict(zip(mesh.axis_names, map(int, index))) for index, device in np.ndenumerate(mesh.devices)
                  if device.process_index == jax.process_index()]
        print(json.dumps({"process": jax.process_index(), "coords": coords}), flush=True)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
