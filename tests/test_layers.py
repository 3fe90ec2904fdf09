"""The package layers (pyproject.toml [tool.importlinter]) hold: `lint-imports` passes on the
package, and fails on a copy of it where a low layer imports a higher one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_package_layers_are_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_kernel_importing_the_model_breaks_the_layers(tmp_path):
    shutil.copytree(
        ROOT / "frontier_jax", tmp_path / "frontier_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    kernels = tmp_path / "frontier_jax" / "kernels" / "__init__.py"
    kernels.write_text(kernels.read_text() + "\nfrom frontier_jax.model import Transformer\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "One-way package layers BROKEN" in result.stdout
    assert "frontier_jax.kernels is not allowed to import frontier_jax.model" in result.stdout
