"""Shared setup of the training tests.

* One tiny model/run configuration (`tiny_config`) used by every test, so that compiled
  programs are shared.  Its learning-rate schedule ("deepseek": warmup 2, hold to step 4,
  cosine over 4 steps, then lr_min) does not depend on `train.steps`, so runs of different
  lengths compile to the same program and a long run's losses are a prefix-comparable
  reference for shorter ones.
* A persistent XLA compilation cache for this test session, shared by the pytest-xdist
  workers and by the subprocesses the tests start (they inherit the environment): each
  train step is compiled once per device count instead of once per `train()` call or
  process.  It is per test run (cold every run), in pytest's temporary base directory.
  Set FRONTIER_JAX_TEST_NO_COMPILE_CACHE=1 to switch it off.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .common import REF_STEPS, reference_overrides, run_lock


def _enable_compile_cache(directory: Path) -> None:
    import jax

    directory.mkdir(parents=True, exist_ok=True)
    settings = {"jax_compilation_cache_dir": str(directory),
                "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # for child processes
    try:  # the cache is set up at the first compile; make it pick up the directory now
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    except Exception:  # pragma: no cover - best effort, only a speed-up
        pass


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A directory of this test run shared by all xdist workers (pytest's base temp dir;
    under xdist each worker's base is <run>/popen-gwN, so <run>/ is shared)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "train_tests_shared"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _compile_cache(shared_dir):
    if not os.environ.get("FRONTIER_JAX_TEST_NO_COMPILE_CACHE"):
        _enable_compile_cache(shared_dir / "jax_compile_cache")
    yield


@pytest.fixture(scope="session")
def reference_run(shared_dir) -> Path:
    """run_dir of an uninterrupted in-process `train()` of the tiny config on the 8 devices:
    REF_STEPS steps, checkpoints every REF_EVERY steps (all kept).  Computed once per test
    run (under a lock shared by the xdist workers); treat it as read-only."""
    from frontier_jax.config import load_config
    from frontier_jax.train.loop import train

    run_dir = shared_dir / "reference_run"
    with run_lock(shared_dir, "reference_run"):
        if not (run_dir / "DONE").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            history = train(load_config("model/toy", reference_overrides()), run_dir, progress=False)
            assert [r["step"] for r in history] == list(range(1, REF_STEPS + 1))
            (run_dir / "DONE").touch()
    return run_dir
