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


def _copy_with(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of the package with `files` (paths under frontier_jax/) appended to or created."""
    shutil.copytree(
        ROOT / "frontier_jax", tmp_path / "frontier_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name, text in files.items():
        path = tmp_path / "frontier_jax" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((path.read_text() if path.exists() else "") + text)
    return tmp_path


def test_posttrain_and_serve_sit_side_by_side_between_eval_and_config(tmp_path):
    """serve and posttrain may import eval and what lies below it, not each other, not config."""
    result = _lint(
        _copy_with(
            tmp_path,
            {
                "serve/__init__.py": "\nimport frontier_jax.eval.scorer\nimport frontier_jax.config\n",
                "posttrain/__init__.py": "\nimport frontier_jax.runtime.logprobs\nimport frontier_jax.serve\n",
            },
        )
    )
    assert "One-way package layers BROKEN" in result.stdout
    assert "frontier_jax.serve is not allowed to import frontier_jax.config" in result.stdout
    assert "frontier_jax.posttrain is not allowed to import frontier_jax.serve" in result.stdout
    assert "import frontier_jax.eval" not in result.stdout
    assert "import frontier_jax.runtime" not in result.stdout


def test_the_model_stack_importing_data_breaks_the_contract(tmp_path):
    """runtime (and every layer below the trainer) takes arrays, never the data package."""
    result = _lint(_copy_with(tmp_path, {"runtime/__init__.py": "\nimport frontier_jax.data.tokenizer\n"}))
    assert result.returncode != 0
    assert "data stays above the model stack BROKEN" in result.stdout
    assert "frontier_jax.runtime is not allowed to import frontier_jax.data" in result.stdout
