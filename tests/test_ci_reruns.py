"""The rerun policy of pyproject.toml's [tool.pytest.ini_options] (pytest-rerunfailures under
pytest-xdist): a test whose worker process crashes runs once more on a fresh worker, a test that
fails is never run again.  Checked by running pytest with the project's configuration on two
throw-away tests that count their runs in files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CRASHES_ONCE = """
import ctypes, os, pathlib

def test_crashes_on_its_first_run():
    runs = pathlib.Path(os.environ["RUNS_DIR"]) / "crash"
    runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
    if len(runs.read_text()) == 1:
        ctypes.string_at(0)  # a segmentation fault: the worker dies
"""

FAILS = """
import os, pathlib

def test_fails():
    runs = pathlib.Path(os.environ["RUNS_DIR"]) / "fail"
    runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
    assert False, "a real failure"
"""


def test_a_crashed_worker_reruns_its_test_and_a_failure_is_not_rerun(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_crash.py").write_text(textwrap.dedent(CRASHES_ONCE))
    (tests / "test_fail.py").write_text(textwrap.dedent(FAILS))
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(REPO / "pyproject.toml"),
            "-n",
            "2",
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        + ["--rootdir", str(tmp_path), str(tests)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "RUNS_DIR": str(runs), "PYTEST_ADDOPTS": ""},
        cwd=tmp_path,
    )
    summary = proc.stdout.strip().splitlines()[-1]
    assert (runs / "crash").read_text() == "xx", proc.stdout  # crashed, then passed on a fresh worker
    assert (runs / "fail").read_text() == "x", proc.stdout  # failed once, not run again
    assert proc.returncode == 1 and "1 failed, 1 passed, 1 rerun" in summary, proc.stdout
