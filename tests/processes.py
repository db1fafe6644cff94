"""Find the processes a test started, wherever they ended up in the process tree.

Every process started with ``exec`` carries its environment in ``/proc/PID/environ``; a
variable set before a command starts (``marked_env``) therefore names all of its descendants,
also those whose parent died and who were handed to init. A process forked without ``exec``
shows its parent's environment as that parent was started, so the session check also looks
at the live descendants of the test process itself.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from typing import Optional

import psutil

SESSION = "SSLKIT_TEST_SESSION"  # set for the whole test session (conftest.py)
JOB = "SSLKIT_TEST_JOB"  # set by a test for one command it starts


def new_mark() -> str:
    return uuid.uuid4().hex


def marked_env(mark: str, base: Optional[dict] = None) -> dict:
    """``base`` (default: this process's environment) with ``JOB=mark``, for a command to start with."""
    return {**(os.environ if base is None else base), JOB: mark}


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def marked(mark: str, var: str = JOB) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment holds ``mark`` in ``var`` (a ':'-separated list of
    marks: a test session started inside another adds its own), this one excluded."""
    prefix = f"{var}=".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                values = [item[len(prefix):] for item in handle.read().split(b"\0") if item.startswith(prefix)]
            if not values or mark.encode() not in values[0].split(b":"):
                continue
            proc = psutil.Process(int(entry.name))
        except (OSError, psutil.Error):
            continue
        if _alive(proc):
            found.append(proc)
    return found


def live_descendants(pid: Optional[int] = None) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    return [proc for proc in children if _alive(proc)]


def wait_until_gone(find, timeout: float) -> list[psutil.Process]:
    """Poll ``find()`` until it returns nothing or ``timeout`` seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        left = find()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def describe(procs: Iterable[psutil.Process]) -> str:
    """One line per process: pid, parent, command line and the test that started it, where known."""
    lines = []
    for proc in procs:
        try:
            cmd = " ".join(proc.cmdline())[:160]
            ppid = proc.ppid()
            test = proc.environ().get("PYTEST_CURRENT_TEST", "?")
        except psutil.Error:
            continue
        lines.append(f"pid {proc.pid} (parent {ppid}): {cmd}  [started during: {test}]")
    return "\n".join(lines)


def kill_all(procs: Iterable[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def run_two_ranks(script: str, *args: str, out) -> list[dict]:  # noqa: ANN001 -- out: a pathlib.Path
    """Run ``script ARGS OUT`` as 2 gloo ranks under torchrun; the records each rank saved as OUT/rank<r>.pt."""
    import subprocess
    import sys

    import torch

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *args, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
