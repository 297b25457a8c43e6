"""Every console script's flag mistakes are one line, ``prog: error: ...`` with exit 2 (no usage block)."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

SCRIPTS = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
ARGPARSE_SCRIPTS = {name: target for name, target in SCRIPTS.items() if name != "timerefine-train"}  # Hydra


def script_main(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


@pytest.mark.parametrize("name", sorted(ARGPARSE_SCRIPTS))
def test_an_unknown_flag_is_one_line(name, capsys):
    with pytest.raises(SystemExit) as stopped:
        script_main(ARGPARSE_SCRIPTS[name])(["--no-such-flag"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.count("\n") == 1 and ": error: " in err and "usage:" not in err, err


@pytest.mark.parametrize("name", sorted(ARGPARSE_SCRIPTS))
def test_help_still_shows_the_usage(name, capsys):
    with pytest.raises(SystemExit) as stopped:
        script_main(ARGPARSE_SCRIPTS[name])(["--help"])
    assert stopped.value.code == 0 and "usage:" in capsys.readouterr().out
