"""Subprocess checks that run beside the rest of the suite; not a test module itself.

A few tests only start a process and check what it printed: the CUDA-simulator run of each
``test_cuda_*.py`` file, the PTX build, the benchmark's quick runs. Together they are about a
third of the suite's time, and they spend it on one core, as the in-process tests spend most of
theirs in Numba's (single-threaded) compiler. CI has two cores, so the two can overlap:

* a module declares its process at import with :class:`Run` and marks the tests that read it
  with ``run.mark`` (a test that is skipped by a true ``skipif`` does not start it);
* when collection ends, ``conftest.py`` moves the marked tests to the end of the session and
  starts the processes the selected tests need, one after another, in a background thread;
* a marked test calls ``run.result()``, which waits for the process (or runs it there and then
  if nothing started it, e.g. when the test module is imported outside pytest's collection).

What a process prints and returns is unchanged by where it runs; only its timings (the
benchmark's, which these tests do not judge) see the other core busy.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import threading

import pytest

#: Every declared run, in declaration order.
_RUNS: list["Run"] = []


class Run:
    """One subprocess, started at most once per session, with its result kept for its tests.

    ``argv`` is the command, or a function of ``folder`` (a fresh directory for the process's
    output files, removed at exit) that returns it. ``env`` entries are added to this process's
    environment.
    """

    def __init__(self, name: str, argv, *, env=None, timeout: float = 600.0):
        self.name = name
        self.folder = tempfile.mkdtemp(prefix=f"fusedgrad-{name}-")
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)
        self.argv = [str(a) for a in (argv(self.folder) if callable(argv) else argv)]
        self.env = {**os.environ, **(env or {})}
        self.timeout = timeout
        self.mark = pytest.mark.background_run(self)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._started = False
        self._process: subprocess.Popen | None = None
        self._result: subprocess.CompletedProcess | None = None
        self._error: BaseException | None = None
        _RUNS.append(self)

    def claim(self) -> bool:
        """True for the one caller that gets to run the process."""
        with self._lock:
            if self._started:
                return False
            self._started = True
            return True

    def execute(self) -> None:
        try:
            with subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) as process:
                self._process = process
                try:
                    stdout, stderr = process.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate()
                    raise
            self._result = subprocess.CompletedProcess(self.argv, process.returncode, stdout,
                                                       stderr)
        except BaseException as error:  # noqa: BLE001 (re-raised in the waiting test)
            self._error = error
        finally:
            self._done.set()

    def kill(self) -> None:
        """Stop the process if it is still running (the session ended before its test)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def result(self) -> subprocess.CompletedProcess:
        """The finished process (stdout and stderr as text); runs it now if nobody has."""
        if self.claim():
            self.execute()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


def start_in_background(runs) -> threading.Thread | None:
    """Run ``runs`` one after another in a daemon thread (at most one extra busy core)."""
    runs = [run for run in runs if run.claim()]
    if not runs:
        return None

    def work():
        for run in runs:
            run.execute()

    thread = threading.Thread(target=work, name="background-runs", daemon=True)
    thread.start()
    return thread


def runs_of(item) -> list[Run]:
    """The runs a collected test reads (its ``background_run`` marks); none when a
    ``skipif(True, ...)`` mark will skip it."""
    if any(mark.args and mark.args[0] is True for mark in item.iter_markers("skipif")):
        return []
    return [mark.args[0] for mark in item.iter_markers("background_run")]


def stop_all() -> None:
    for run in _RUNS:
        run.kill()
