"""What checkpoint checksums cost: SHA-256 throughput of `runtime.integrity` on this machine and
the time to write and to verify the manifest of a checkpoint of a config's train state.

    python benchmarks/checkpoint_checksums.py --config model/bench-1b [--dir /tmp] [--gib G]

The train state's bytes (params, expert biases, AdamW moments, step, rng) come from
`jax.eval_shape` of the config's `Trainer` (nothing allocated).  A step directory of that size is
written as files of at most 2 GiB (orbax's OCDBT data files on a local disk) of random bytes
(--gib: another total instead), then `write_manifest` and `verify_step` are timed with the files
in the page cache (a fresh read from disk adds the disk's time): wall time, and CPU time of all
threads (per-core throughput, meaningful on a busy machine too).  One line per figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from frontier_jax.config import load_config
from frontier_jax.runtime.integrity import verify_step, write_manifest
from frontier_jax.train.step import Trainer

FILE_BYTES = 2 << 30  # orbax's OCDBT target data file size on a local file system
BLOCK = 64 << 20


def state_bytes(config: str) -> int:
    shapes = jax.eval_shape(lambda: Trainer(load_config(config, ["mesh.data=1"])).init(0))
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def write_step(step_dir: str, total: int) -> None:
    os.makedirs(step_dir)
    block = np.random.default_rng(0).bytes(BLOCK)
    for index in range((total + FILE_BYTES - 1) // FILE_BYTES):
        size = min(FILE_BYTES, total - index * FILE_BYTES)
        with open(os.path.join(step_dir, f"data-{index:03d}"), "wb") as f:
            for start in range(0, size, BLOCK):
                f.write(block[: min(BLOCK, size - start)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="model/bench-1b")
    parser.add_argument("--dir", default=None, help="where to write the step (default: the temp dir)")
    parser.add_argument(
        "--gib", type=float, default=None, help="hash this many GiB instead of the state's size"
    )
    args = parser.parse_args()
    total = state_bytes(args.config)
    print(f"{args.config}: train state {total / 1e9:.2f} GB")
    if args.gib is not None:
        total = int(args.gib * 2**30)
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        write_step(os.path.join(root, "1"), total)
        for what, run in (
            ("write_manifest", lambda: write_manifest(os.path.join(root, "1"), 1)),
            ("verify_step", lambda: verify_step(root, 1)),
        ):
            start, cpu = time.perf_counter(), time.process_time()
            run()
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            print(
                f"{what}: {total / 1e9:.2f} GB in {seconds:.1f} s = {total / seconds / 1e9:.2f} GB/s on "
                f"{os.cpu_count()} cores; {cpu:.1f} CPU-s = {total / cpu / 1e9:.2f} GB per CPU-second"
            )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
