"""Run the project's scripts as real processes without a fresh interpreter's start-up. Each is forked
from a server that has imported the CLIs (multiprocessing's forkserver: an interpreter started once, with
the tests' ``sys.path``), then runs as ``python <argv>`` would: its argv, ``sys.path[0]``, ``__main__``,
folder, environment, output and exit code (negative: the signal that ended it). ``python train.py``
spends about 15 s of CPU on its imports on an AVX2-only EPYC (bench/RESULTS.md); a fork, well under one.

Not for what a fresh interpreter itself is tested for: entry points, warnings printed at import,
variables read while torch loads, DDP ranks and SLURM jobs. All forked runs share the server's hash seed
(``PYTHONHASHSEED``), so a run that resumed runs are compared with starts ``fresh`` (another seed)."""

from __future__ import annotations

import atexit
import io
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["timerefine.train", "timerefine.evaluate"])
_SERVER_ENV = dict(os.environ)  # as the session began: not a test's monkeypatched one


def _ensure_server() -> None:
    """Start the server, if it is not running, with the environment of the session's start."""
    current = dict(os.environ)
    os.environ.clear()
    os.environ.update(_SERVER_ENV)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(current)


def _exit_code(exit_: SystemExit) -> int:
    """The status ``sys.exit(code)`` ends an interpreter with; a message is printed to stderr."""
    if exit_.code is None or isinstance(exit_.code, int):
        return exit_.code or 0
    print(exit_.code, file=sys.stderr)
    return 1


def _run_argv(argv: list[str], cwd: str) -> None:
    """``python *argv``: a script, ``-m module`` or ``-c code``, with the ``sys.argv``, ``sys.path[0]``
    and ``__main__`` module that ``python`` gives each."""
    if argv[0] == "-m":
        sys.argv, sys.path[0] = ["-m", *argv[2:]], cwd
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
        sys.modules["__main__"] = main = types.ModuleType("__main__")
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv, sys.path[0] = list(argv), str(Path(cwd, argv[0]).resolve().parent)
        runpy.run_path(argv[0], run_name="__main__")


def _main(argv: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the forked child: ``python *argv`` in ``cwd`` with ``env``, its output appended to the files,
    ended as CPython ends: non-daemon threads joined, atexit run, streams flushed, then its status."""
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND), fd)
    raw = (open(fd, "wb", buffering=0, closefd=False) for fd in (1, 2))  # noqa: SIM115
    sys.stdout, sys.stderr = (  # with CPython's error handlers
        io.TextIOWrapper(stream, errors=errors, write_through=True)
        for stream, errors in zip(raw, ("strict", "backslashreplace"), strict=True)
    )
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # the server's, from its TMPDIR, cached at its first use
    if threads := env.get("OMP_NUM_THREADS"):  # OpenMP read the server's when torch loaded
        torch.set_num_threads(int(threads))
    code, interrupted = 0, False
    try:
        _run_argv(argv, cwd)
    except SystemExit as exit_:
        code = _exit_code(exit_)
    except BaseException as error:
        sys.excepthook(type(error), error, error.__traceback__)
        code, interrupted = 1, isinstance(error, KeyboardInterrupt)
    threading._shutdown()  # what the interpreter does at its end: wait for non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if interrupted:  # CPython ends by the signal itself
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


class Launched:
    """A started ``python *argv``, as ``subprocess.Popen`` with its output captured (or appended to
    ``log``): ``pid``, ``send_signal``, ``poll``, ``wait`` and ``communicate``. One still running when
    the tests end is killed then, as is its output folder removed."""

    def __init__(
        self, argv: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None, log: Path | None = None
    ) -> None:
        self.args = [sys.executable, *argv]
        self._folder = Path(tempfile.mkdtemp(prefix="launched-"))
        self._outputs = (log, log) if log else (self._folder / "stdout", self._folder / "stderr")
        for path in self._outputs:
            path.touch()
        env = dict(os.environ if env is None else env)
        self._process = _context.Process(target=_main, args=(argv, str(cwd), env, *map(str, self._outputs)))
        _ensure_server()
        self._process.start()
        _started.append(self)
        self.pid = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, number: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, number)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Its stdout and stderr once it has ended; killed if it is still running after ``timeout``."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired as expired:
            self.send_signal(signal.SIGKILL)
            self.wait()
            expired.output, expired.stderr = self._read()
            self.end()
            raise
        output = self._read()
        self.end()
        return output

    def _read(self) -> tuple[str, str]:
        return tuple(path.read_text(errors="replace") for path in self._outputs)

    def end(self) -> None:
        """Kill it if it still runs; remove its output folder."""
        self.send_signal(signal.SIGKILL)
        self.wait()
        shutil.rmtree(self._folder, ignore_errors=True)
        if self in _started:
            _started.remove(self)


_started: list[Launched] = []


@atexit.register  # before multiprocessing's own atexit joins them
def _end_all() -> None:
    for launched in list(_started):
        launched.end()


def run(
    argv: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """As ``subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)``."""
    launched = Launched(argv, cwd, env)
    stdout, stderr = launched.communicate(timeout)
    return subprocess.CompletedProcess([sys.executable, *argv], launched.returncode, stdout, stderr)


def fresh(
    argv: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """``python *argv`` in a fresh interpreter: for a run compared with forked ones (another hash seed)."""
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
