"""Shared setup of the training tests.

* One tiny model/run configuration (`common.tiny_config`) used by every test, so that
  compiled programs are shared.  Its learning-rate schedule ("deepseek": warmup 2, hold to step 4,
  cosine over 4 steps, then lr_min) does not depend on `train.steps`, so runs of different
  lengths compile to the same program and a long run's losses are a prefix-comparable
  reference for shorter ones.
* No persistent XLA compilation cache: with jax 0.10.2 on the CPU, writing executables into it
  crashed test workers (segfaults in `compilation_cache.put_executable_and_time`), so every
  process compiles its own programs.
* `reference_run`: one uninterrupted training run that the checkpoint tests compare with.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .common import REF_STEPS, reference_overrides, run_lock, shared_test_dir


def pytest_collection_modifyitems(config, items):
    """Start the README demo (minutes of one worker) first, so that under pytest-xdist the other
    worker runs everything else meanwhile instead of the demo starting last."""
    demo = [item for item in items if item.nodeid.endswith("test_readme_demo_trains_logs_plots_and_resumes")]
    for item in demo:
        items.remove(item)
    items[:0] = demo


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A directory of this test run shared by all xdist workers."""
    return shared_test_dir(tmp_path_factory)


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


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if the training loop reaches `jax.jit` (init or train step)."""
    import jax

    from frontier_jax.train import loop

    class JaxWithoutJit:
        """The jax module as the loop sees it, except that `jit` fails the test."""

        def __getattr__(self, name):
            if name == "jit":
                raise AssertionError("the loop got as far as jitting (compiling) before rejecting the config")
            return getattr(jax, name)

    monkeypatch.setattr(loop, "jax", JaxWithoutJit())
