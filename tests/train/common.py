"""Helpers shared by the training tests: the tiny run configuration, metrics reading and
child processes (see conftest.py for why one configuration is shared)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = [
    "model.vocab_size=272",
    "model.hidden_size=32",
    "model.num_layers=3",
    "model.first_k_dense=1",
    "model.dense_ffn_dim=64",
    "model.num_heads=2",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=4",
    "model.v_head_dim=8",
    "model.n_routed_experts=4",
    "model.n_shared_experts=1",
    "model.num_experts_per_tok=2",
    "model.moe_ffn_dim=16",
    "model.n_group=2",
    "model.topk_group=1",
    "model.mtp_depth=1",
]
TINY_TRAIN = [
    "train.seq_len=32",
    "train.global_batch=8",
    "train.lr=3e-3",
    "train.lr_min=3e-4",
    "train.schedule=deepseek",
    "train.warmup_steps=2",
    "train.decay_start=4",
    "train.decay_steps=4",
    "train.balance_alpha=1e-2",
    "train.z_loss=1e-3",  # both terms visibly enter the gradient
    "checkpoint.async_save=true",
]
TINY = TINY_MODEL + TINY_TRAIN


def tiny_overrides(*extra: str) -> list[str]:
    """Dotted overrides of the shared tiny run (for `load_config("model/toy", ...)` or the CLI)."""
    return TINY + list(extra)


def tiny_config(*extra: str):
    from frontier_jax.config import load_config

    return load_config("model/toy", tiny_overrides(*extra))


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def subprocess_env(devices: int | None = 8) -> dict:
    """Environment for a child process: `devices` fake CPU devices (None = jax's default of 1,
    i.e. no device-count flag at all), the repo importable."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_python(
    code: str, *, devices: int | None = 8, timeout: float = 300, cwd=None
) -> subprocess.CompletedProcess:
    """Runs `python -c code` in a fresh interpreter; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(devices),
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def run_lock(shared_dir: Path, name: str):
    """An exclusive lock shared by the xdist workers of this run: work done under it (e.g. a
    shared run directory that tests read) is done by one worker while the other waits, and then
    finds the result instead of making it again."""
    shared_dir.mkdir(parents=True, exist_ok=True)
    with open(shared_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_test_dir(tmp_path_factory) -> Path:
    """A directory of this test run shared by all xdist workers (pytest's base temp dir;
    under xdist each worker's base is <run>/popen-gwN, so <run>/ is shared)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "train_tests_shared"
    path.mkdir(exist_ok=True)
    return path


def restore_checkpoint(run_dir, step: int, cfg, shardings=None):
    """(state, data-iterator state) of checkpoint `step` of run_dir, laid out on `shardings`
    (a pytree matching the train state; default: everything on the first device)."""
    import jax

    from frontier_jax.data import build_train_iterator
    from frontier_jax.train.checkpoint import Checkpointer, abstract_with_shardings
    from frontier_jax.train.step import Trainer

    trainer = Trainer(cfg)
    shapes = jax.eval_shape(lambda: trainer.init(0))
    if shardings is None:
        first = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: first, shapes)
    data = build_train_iterator(cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch)
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints", cfg.checkpoint)
    try:
        state = checkpointer.restore(step, abstract_with_shardings(shapes, shardings), data)
    finally:
        checkpointer.close()
    return state, data.get_state()


def assert_trees_equal(a, b, what: str = "") -> None:
    """Bitwise equality of two pytrees of arrays (same structure)."""
    import jax
    import numpy as np

    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}{jax.tree_util.keystr(path)}"
        np.testing.assert_array_equal(x, y, err_msg=f"{what}{jax.tree_util.keystr(path)}")


# Metrics that depend on wall-clock time, not on the computation.
TIMING_KEYS = ("step_time_s", "tokens_per_s", "mfu")


def computed_metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


# The shared reference run (conftest.py `reference_run`): REF_STEPS steps straight, a
# checkpoint every REF_EVERY steps, all kept.
REF_STEPS = 40
REF_EVERY = 4


def reference_overrides(*extra: str) -> list[str]:
    return tiny_overrides(
        f"train.steps={REF_STEPS}", f"checkpoint.every={REF_EVERY}", "checkpoint.keep=100", *extra
    )


def cli_train_command(run_dir, *overrides: str) -> list[str]:
    """`python -m frontier_jax train --config model/toy --run-dir DIR <tiny overrides> ...`."""
    return [
        sys.executable,
        "-m",
        "frontier_jax",
        "train",
        "--config",
        "model/toy",
        "--run-dir",
        str(run_dir),
        *tiny_overrides(*overrides),
    ]


def child_pids(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is `pid` (Linux /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def running(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (zombies, which only wait to be reaped, do not)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def kill_9_and_wait_for(proc, workers: set[int], seconds: float = 10) -> set[int]:
    """SIGKILLs `proc` (its child processes `workers` get no word) and waits up to `seconds` for
    the workers to end on their own; returns those still running then."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + seconds
    while running(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running(workers)


def end_processes(proc, workers: set[int]) -> None:
    """Cleanup after a test of kill -9: `proc` and any of `workers` left over by a failure."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in running(workers):
        os.kill(pid, signal.SIGKILL)
