"""The fresh-machine contract: CI runs the README's test command in a new virtualenv, and every
third-party module the code imports comes from a package that requirements*.txt declares."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The one-line commands of README.md's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_in_a_new_virtualenv():
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = script[-1]
    assert "python -m pytest" in test_command
    assert test_command in readme_commands()
    venv_line = next(i for i, line in enumerate(script) if "-m venv" in line)
    activate_line = next(i for i, line in enumerate(script) if "/bin/activate" in line)
    assert venv_line < activate_line < len(script) - 1


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared_distributions() -> set[str]:
    """Names in pyproject.toml's dependencies and in requirements*.txt."""
    lines = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirements in ROOT.glob("requirements*.txt"):
        lines += requirements.read_text().splitlines()
    names = (re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line) for line in lines)
    return {
        _normalized(match.group(1))
        for line, match in zip(lines, names, strict=True)
        if match and not line.lstrip().startswith(("#", "-"))
    }


def _imported_top_level_modules(files: list[Path]) -> set[str]:
    modules = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_imported_package_is_declared():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    paths = tracked.stdout.split()
    local = {path.split("/")[0].removesuffix(".py") for path in paths}
    imported = _imported_top_level_modules([ROOT / p for p in paths if p.endswith(".py")])
    third_party = imported - set(sys.stdlib_module_names) - local - {"__future__"}
    owners = metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared = sorted(
        module
        for module in third_party
        if not any(_normalized(dist) in declared for dist in owners.get(module, []))
    )
    assert not undeclared, f"imported but not declared in pyproject.toml or requirements*.txt: {undeclared}"


def test_the_readme_one_process_option_runs_the_suite_without_workers():
    """Before: README's ``-p no:xdist`` ended pytest with a usage error, the ``-n`` of addopts unknown."""
    option = re.search(r"`([^`]+)` runs it in one process", (ROOT / "README.md").read_text())
    assert option, "README.md says how to run the suite in one process"
    command = [sys.executable, "-m", "pytest", *option[1].split(), "--collect-only", "-q"]
    listed = subprocess.run(
        [*command, "tests/test_windows.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert "test_windows.py::" in listed.stdout and "workers" not in listed.stdout
