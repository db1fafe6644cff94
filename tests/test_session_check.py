"""The session-end check of tests/conftest.py fails a test run that leaves a process behind: a child
never waited for, and an orphan handed to init. It kills them, and passes a run that leaves nothing."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent

LEAKY = '''
import subprocess


def test_leaks(tmp_path_factory):
    child = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # never waited for
    orphan = subprocess.run(["bash", "-c", "sleep 301 >/dev/null 2>&1 & echo $!"], capture_output=True,
                            text=True).stdout.strip()
    with open(PIDS, "w") as handle:
        handle.write(f"{child.pid} {orphan}")
'''
CLEAN = '''
import subprocess


def test_cleans_up():
    subprocess.run(["sleep", "0.1"], check=True)
'''


def _session(tmp_path: Path, test: str) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "processes.py"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "test_case.py").write_text(f"PIDS = {str(tmp_path / 'pids.txt')!r}\n" + test)
    env = {**os.environ, "SSLKIT_TEST_GRACE_S": "2"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_session_that_leaves_processes_fails_and_they_are_killed(tmp_path):
    result = _session(tmp_path, LEAKY)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout and "processes left behind" in result.stdout
    child, orphan = (int(pid) for pid in (tmp_path / "pids.txt").read_text().split())
    report = result.stdout[result.stdout.index("processes left behind"):]
    for pid, command in ((child, "sleep 300"), (orphan, "sleep 301")):
        assert f"pid {pid} " in report and command in report and "test_case.py::test_leaks" in report
    deadline = time.monotonic() + 10
    while (_alive(child) or _alive(orphan)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child) and not _alive(orphan)


def test_a_session_that_leaves_nothing_passes(tmp_path):
    result = _session(tmp_path, CLEAN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "processes left behind" not in result.stdout
