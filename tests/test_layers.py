"""The layer map is enforced: pyproject.toml's import-linter contracts hold (a lower layer importing a
higher one fails here), and every package the project installs is under them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = (
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
)


def test_import_contracts_are_kept():
    result = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 broken" in result.stdout


def test_every_installed_package_is_in_the_contracts():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = {name.rstrip("*") for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - {"tests"}
    assert installed == packages
    assert set(pyproject["tool"]["importlinter"]["root_packages"]) == installed
