"""tests/launched.py runs a command as ``python`` does: same exit code, output, argv, folder and
environment as a fresh interpreter given the same command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import launched

SHOWS_ITS_PLACE = (
    "import os, sys, tempfile; print(sys.argv, os.getcwd(), os.environ['X'], tempfile.gettempdir())"
)
COMMANDS = {
    "exit code": ["-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
    "exit message": ["-c", "import sys; sys.exit('bye')"],
    "exception": ["-c", "raise ValueError('bad')"],
    "Ctrl-C": ["-c", "raise KeyboardInterrupt"],
    "signal": ["-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"],
    "atexit": ["-c", "import atexit; atexit.register(print, 'at exit')"],
    "place": ["-c", SHOWS_ITS_PLACE, "a", "b"],
    "script": ["script.py", "a"],
    "module": ["-m", "json.tool", "--help"],
}


@pytest.mark.parametrize("name", COMMANDS)
def test_a_launched_command_ends_as_in_a_fresh_interpreter(name, tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "script.py").write_text("import sys\nprint(__name__, sys.argv, sys.path[0])\nsys.exit(4)\n")
    env = dict(os.environ, X="1", TMPDIR=str(tmp_path / "tmp"))
    command = COMMANDS[name]
    fresh = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True)
    forked = launched.run(command, cwd=tmp_path, env=env, timeout=120)
    assert forked.returncode == fresh.returncode
    assert forked.stdout == fresh.stdout
    last_line = [output.stderr.strip().splitlines()[-1:] for output in (forked, fresh)]
    assert last_line[0] == last_line[1]


def test_a_killed_command_ends_by_the_signal_with_its_output_so_far(tmp_path):
    started = tmp_path / "started"
    command = [
        "-c",
        f"import pathlib, time; print('up', flush=True); pathlib.Path({str(started)!r}).touch()\n"
        "time.sleep(60)",
    ]
    process = launched.Launched(command, log=tmp_path / "log")
    while not started.exists():
        assert process.poll() is None
    process.send_signal(9)
    assert process.communicate(timeout=60) == ("up\n", "up\n") and process.returncode == -9
    assert (tmp_path / "log").read_text() == "up\n"


def test_a_command_past_its_timeout_is_killed():
    with pytest.raises(subprocess.TimeoutExpired):
        launched.run(["-c", "import time; time.sleep(60)"], timeout=1)
