"""Data worker processes end with the trainer that started them (frontier_jax/data/parent_watch.py):
the trainer's data iterator with `data.worker_count=2` is killed with SIGKILL, which leaves it no
chance to stop its grain workers; they are gone within a few seconds (they used to run on,
orphaned, for minutes)."""

from __future__ import annotations

import subprocess
import sys

from .common import REPO, child_pids, end_processes, kill_9_and_wait_for, subprocess_env, tiny_overrides

ITERATOR_SCRIPT = """
import sys, time
from frontier_jax.config import load_config
from frontier_jax.train.batches import data_iterator

data = data_iterator(load_config("model/toy", sys.argv[1:]))
next(data)
print("reading", flush=True)
time.sleep(600)
"""


def test_grain_workers_end_within_seconds_of_a_kill_9_of_the_trainer():
    proc = subprocess.Popen(
        [sys.executable, "-c", ITERATOR_SCRIPT, *tiny_overrides("data.worker_count=2")],
        env=subprocess_env(devices=None),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers: set[int] = set()
    try:
        assert proc.stdout.readline() == "reading\n", proc.communicate(timeout=60)[1][-3000:]
        workers = child_pids(proc.pid)
        assert len(workers) >= 2, workers  # the grain workers (and multiprocessing's resource tracker)
        left = kill_9_and_wait_for(proc, workers)
        assert not left, f"workers {left} still run 10 s after their trainer was killed"
    finally:
        end_processes(proc, workers)
