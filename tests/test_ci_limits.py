"""A CI that cannot hang: a test past its time limit fails with every thread's stack and the run goes on; one
stuck where that cannot reach it ends the run with the same dump; no process a test started outlives it.

The limits are the project's own (pyproject's [tool.pytest.ini_options]), run in a nested pytest with shorter
values, so these tests take seconds."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import reaping
from reaping import run_reaped

TESTS = Path(__file__).resolve().parent


def _pytest(repo: Path, folder: Path, *options: str) -> tuple[subprocess.CompletedProcess, float]:
    """A nested `pytest -q` of ``folder`` under the project's pytest settings; its output and seconds."""
    started = time.perf_counter()
    done = run_reaped([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                       str(repo / "pyproject.toml"), "--rootdir", str(folder), *options, str(folder)],
                      timeout=180, cwd=folder)
    return done, time.perf_counter() - started


def test_the_project_sets_a_limit_per_test_and_a_hard_stop_behind_it(pytestconfig: pytest.Config):
    limit, hard = float(pytestconfig.getini("timeout")), float(pytestconfig.getini("faulthandler_timeout"))
    assert 0 < limit < hard <= 15 * 60 and pytestconfig.getini("faulthandler_exit_on_timeout") is True
    assert pytestconfig.getini("timeout_method") == "signal"  # fails the one test, the run goes on


def test_a_test_past_its_limit_fails_with_all_stacks_and_the_run_goes_on(repo: Path, tmp_path: Path):
    (tmp_path / "test_slow.py").write_text(
        "import threading, time\n\n"
        "def test_sleeps_too_long():\n"
        "    threading.Thread(target=time.sleep, args=(60,), name='helper', daemon=True).start()\n"
        "    time.sleep(60)\n\n"
        "def test_after_it():\n"
        "    pass\n")
    done, seconds = _pytest(repo, tmp_path, "-o", "timeout=2")
    assert done.returncode == 1 and "1 failed, 1 passed" in done.stdout, done.stdout
    assert "Failed: Timeout" in done.stdout and "test_sleeps_too_long" in done.stdout
    assert "helper" in done.stdout  # the other threads' stacks too
    assert seconds < 60


def test_a_test_no_signal_can_interrupt_ends_the_run_with_all_stacks(repo: Path, tmp_path: Path):
    (tmp_path / "test_stuck.py").write_text(
        "import signal, time\n\n"
        "def test_stuck_in_c_code():\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as a call that never returns to Python\n"
        "    time.sleep(60)\n")
    done, seconds = _pytest(repo, tmp_path, "-o", "timeout=2", "-o", "faulthandler_timeout=5")
    assert done.returncode != 0, done.stdout
    assert "Timeout (0:00:05)!" in done.stdout and "test_stuck_in_c_code" in done.stdout, done.stdout
    assert seconds < 60


def test_a_process_left_running_fails_its_test_and_is_killed(repo: Path, tmp_path: Path):
    pid_file = tmp_path / "pid"
    (tmp_path / "conftest.py").write_text(
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        f"spec = importlib.util.spec_from_file_location('project_conftest', {str(TESTS / 'conftest.py')!r})\n"
        "project = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(project)\n"
        "no_process_left_behind = project.no_process_left_behind\n")
    (tmp_path / "test_leaves.py").write_text(
        "import subprocess, sys\n\n"
        "def test_starts_and_forgets():\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n\n"
        "def test_after_it():\n"
        "    pass\n")
    done, _ = _pytest(repo, tmp_path)
    assert "2 passed, 1 error" in done.stdout and "left 1 process(es) running, now killed" in done.stdout, done.stdout
    assert not _running(int(pid_file.read_text()))


def test_run_reaped_kills_the_whole_group_on_timeout_and_on_success(tmp_path: Path):
    script = "import subprocess, sys, time\n" \
             "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n" \
             "open(sys.argv[1], 'w').write(str(child.pid))\n" \
             "time.sleep(float(sys.argv[2]))\n"
    with pytest.raises(subprocess.TimeoutExpired):
        run_reaped([sys.executable, "-c", script, str(tmp_path / "a"), "300"], timeout=3)
    done = run_reaped([sys.executable, "-c", script, str(tmp_path / "b"), "0"], timeout=60)
    assert done.returncode == 0
    assert not _running(int((tmp_path / "a").read_text()))  # the grandchild of a command that timed out
    assert not _running(int((tmp_path / "b").read_text()))  # the grandchild a finished command left behind


def test_leftovers_are_new_descendants_and_reap_ends_them():
    before = {p.pid for p in reaping.descendants()}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        assert [p.pid for p in reaping.leftovers(before)] == [child.pid]
        (name,) = reaping.reap(reaping.leftovers(before))
        assert name.startswith(f"{child.pid} ") and "time.sleep(300)" in name
        assert child.wait(timeout=10) is not None and not reaping.leftovers(before)
    finally:
        child.kill()
        child.wait()


def _running(pid: int) -> bool:
    deadline = time.monotonic() + 10  # a SIGKILLed orphan is reaped by init shortly after
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        time.sleep(0.1)
    return os.path.exists(f"/proc/{pid}") or psutil.pid_exists(pid)


def test_a_shared_library_helper_and_its_workers_are_not_leftovers(tmp_path: Path):
    """A helper like torch inductor's compile workers (started once, reused by later tests) is left alone."""
    deep = tmp_path.joinpath(*["a-long-virtual-environment-folder"] * 6)  # the marker far past 160 characters
    helper = deep / "torch" / "_inductor" / "compile_worker" / "__main__.py"
    helper.parent.mkdir(parents=True)
    helper.write_text("import subprocess, sys, time\n"
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                      "time.sleep(300)\n")
    before = {p.pid for p in reaping.descendants()}
    pool = subprocess.Popen([sys.executable, str(helper)])
    try:
        deadline = time.monotonic() + 30
        while len([p for p in reaping.descendants() if p.pid not in before]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len([p for p in reaping.descendants() if p.pid not in before]) == 2  # the helper and its worker
        assert reaping.leftovers(before) == []
    finally:
        reaping.reap(p for p in reaping.descendants() if p.pid not in before)
        pool.wait(timeout=30)


# ------------------------------------------------------------- .ci/run and .ci/limit
def _minutes(text: str) -> float:
    value, unit = float(text[:-1]), text[-1]
    return value * {"s": 1 / 60, "m": 1, "h": 60}[unit]


def test_ci_installs_and_tests_end_well_inside_the_ci_budget(repo: Path):
    ci = (repo / ".ci" / "run").read_text()
    install = _minutes(re.search(r"INSTALL_LIMIT=\$\{GLANCE_CI_INSTALL_LIMIT:-(\w+)\}", ci).group(1))
    suite = _minutes(re.search(r"TEST_LIMIT=\$\{GLANCE_CI_TEST_LIMIT:-(\w+)\}", ci).group(1))
    assert ci.count('"${pip[@]}"') == 4 and ci.count('bash .ci/limit "$TEST_LIMIT"') == 1
    assert 2 * install + suite + 2 <= 80  # two pip commands, the suite, their kill grace; CI stops at 90


@pytest.mark.parametrize("how", ["past-the-limit", "finished"])
def test_ci_limit_ends_the_command_and_all_it_started(repo: Path, tmp_path: Path, how: str):
    tail = "sleep 300" if how == "past-the-limit" else "exit 3"
    started = time.perf_counter()
    done = run_reaped(["bash", str(repo / ".ci" / "limit"), "2s", "bash", "-c", f"sleep 300 & echo $! > pid; {tail}"],
                      timeout=120, cwd=tmp_path)
    pid = int((tmp_path / "pid").read_text())
    try:
        assert not _running(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if how == "past-the-limit":
        assert done.returncode == 124 and "ran past 2s and was stopped" in done.stdout, done.stdout
    else:
        assert done.returncode == 3 and done.stdout == ""
    assert time.perf_counter() - started < 60
