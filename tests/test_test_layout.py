"""The test tree's own layout: no test module or package may take the top-level import name of an
installed distribution's package (or of the standard library).

pytest (default `prepend` import mode) puts the directory above a test file's outermost package
(`__init__.py` chain) first on `sys.path` and imports the file under that package's name; a test
folder `tests/kernels/` that were a top-level package would then *be* `kernels` for every import in
the run, hiding the real `kernels` distribution that transformers imports. The names are compared
with `importlib.metadata.packages_distributions()`, not `importlib.util.find_spec` (which would
find the shadowing folder itself)."""

import importlib.metadata
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def top_level_import_names(root: Path) -> dict[str, Path]:
    """The top-level module names pytest's `prepend` mode gives the test files under `root`:
    a file's outermost enclosing package (the last directory of its `__init__.py` chain), or the
    file's own stem when its directory is not a package."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        top = path.with_suffix("")
        parent = path.parent
        while (parent / "__init__.py").exists():
            top, parent = parent, parent.parent
        names.setdefault(top.name, top)
    return names


def test_no_test_folder_shadows_an_installed_package():
    installed = importlib.metadata.packages_distributions()
    names = top_level_import_names(TESTS)
    assert "tests" in names, "tests/ is a package, so its folders import as tests.<name>"
    clashes = {
        name: str(path)
        for name, path in names.items()
        if name in installed or name in sys.stdlib_module_names
    }
    assert not clashes, f"test modules shadowing installed packages: {clashes}"


def test_the_layout_check_finds_a_shadowing_folder(tmp_path):
    """The check itself can fail: a non-package `tests/` holding a package `kernels/` (today's
    name of an installed distribution that transformers imports) is reported as `kernels`."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "test_x.py").write_text("")
    (tmp_path / "test_top.py").write_text("")
    assert set(top_level_import_names(tmp_path)) == {"kernels", "test_top"}
