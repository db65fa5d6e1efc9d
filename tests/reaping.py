"""No test leaves a process behind: helpers for tests that start processes, and the checks conftest runs.

``run_reaped`` starts a command in its own session (process group), so that on a timeout, an exception or a
normal exit every process it started, grandchildren included, is killed and waited for: ``subprocess.run``
kills only its direct child. ``leftovers``/``reap`` find and end what a test left running below the pytest
process (DDP workers, a CLI's helpers); conftest fails such a test after reaping, and reaps again at exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

# Helpers that libraries start once per process on purpose and reuse: not a test's leftovers. Each ends
# with the pytest process (multiprocessing's, torch inductor's and wandb's own exit handlers).
SHARED_HELPERS = ("from multiprocessing.resource_tracker import main", "from multiprocessing.forkserver import main",
                  "torch/_inductor/compile_worker", "wandb-core", "wandb_core")


def descendants(pid: int | None = None) -> list[psutil.Process]:
    """Every live process below ``pid`` (default: this one)."""
    try:
        return [p for p in psutil.Process(pid or os.getpid()).children(recursive=True) if _alive(p)]
    except psutil.NoSuchProcess:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def describe(process: psutil.Process) -> str:
    return f"{process.pid} {_command_line(process)[:160]}".rstrip()


def is_shared_helper(process: psutil.Process) -> bool:
    """Matched on the whole command line (a deep venv puts the helper's path far along it)."""
    command = _command_line(process)
    return any(name in command for name in SHARED_HELPERS)


def reap(processes: Iterable[psutil.Process], grace: float = 5.0) -> list[str]:
    """SIGTERM, then SIGKILL after ``grace`` seconds, and wait for each; their descriptions."""
    processes = [p for p in processes if _alive(p)]
    names = [describe(p) for p in processes]
    for p in processes:
        _signal(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        _signal(p, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace)
    return names


def _signal(process: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        process.send_signal(sig)


def leftovers(before: set[int]) -> list[psutil.Process]:
    """Processes below this one that were not there in ``before`` (pids), shared library helpers and their own
    workers excepted."""
    found, todo = [], [psutil.Process()]
    while todo:
        try:
            children = todo.pop().children()
        except psutil.NoSuchProcess:
            continue
        for child in children:
            if _alive(child) and not is_shared_helper(child):
                todo.append(child)
                if child.pid not in before:
                    found.append(child)
    return found


def run_reaped(cmd: list[str], timeout: float, *, merge_stderr: bool = True,
               **popen: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, timeout=timeout, text=True)`` capturing output (stderr into stdout unless
    ``merge_stderr`` is False), whose whole process group is killed when it ends, times out or raises.

    Output goes to temporary files, not pipes: a grandchild that inherited a pipe would keep a reader waiting
    after the command itself has finished."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if merge_stderr else err,
                                start_new_session=True, **popen)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            end(proc)
        out.seek(0)
        err.seek(0)
        output, errors = out.read(), (None if merge_stderr else err.read())
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=output, stderr=errors)
    return subprocess.CompletedProcess(cmd, proc.returncode, output, errors)


def kill_when(cmd: list[str], marker: Path, timeout: float, **popen: Any) -> tuple[bool, str]:
    """Start ``cmd`` in its own session and SIGKILL its whole process group as soon as ``marker`` exists (or it
    ends, or ``timeout`` passes); whether the marker appeared, and the output."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        deadline = time.monotonic() + timeout
        try:
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            end(proc)
        out.seek(0)
        return marker.exists(), out.read()


def end(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s whole process group (it was started in its own session) and wait for ``proc``."""
    _kill_group(proc.pid)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
