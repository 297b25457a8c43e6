"""tests/launched.py runs a command as ``python`` does: the same exit code, stdout, and stderr but for
the traceback's frames, as a fresh interpreter given the same command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import launched

SHOWS_ITS_PLACE = (
    "import os, sys, tempfile\n"
    "print(sys.argv, sys.path[0], os.getcwd(), os.environ['X'], tempfile.gettempdir())"
)
COMMANDS = {
    "exit code": ["-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
    "exit message": ["-c", "import sys; sys.exit('bye')"],
    "exception": ["-c", "raise ValueError('bad')"],
    "Ctrl-C": ["-c", "import atexit; atexit.register(print, 'at exit'); raise KeyboardInterrupt"],
    "signal": ["-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"],
    "atexit": ["-c", "import atexit; atexit.register(print, 'at exit')"],
    "thread": [
        "-c",
        "import threading, time; threading.Thread(target=lambda: [time.sleep(1), print('ran')]).start()",
    ],
    "__main__": ["-c", "import pickle\ndef f(): pass\nprint(pickle.loads(pickle.dumps(f)).__module__)"],
    "place": ["-c", SHOWS_ITS_PLACE, "a", "b"],
    "script": ["script.py", "a"],
    "module in the folder": ["-m", "script", "a"],
    "module": ["-m", "json.tool", "--help"],
}


def test_the_preloaded_clis_print_nothing_at_import():
    """What the server prints at import is not in a forked run's output: here, nothing."""
    imports = "import timerefine.train, timerefine.evaluate"
    fresh = subprocess.run([sys.executable, "-c", imports], cwd=launched.ROOT, capture_output=True, text=True)
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (0, "", "")


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
    unindented = [
        [line for line in run.stderr.splitlines() if not line.startswith(" ")] for run in (forked, fresh)
    ]
    assert unindented[0] == unindented[1]


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
