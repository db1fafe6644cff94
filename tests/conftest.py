"""Session-wide checks: the suite must leave no process behind.

Every command a test starts inherits ``SSLKIT_TEST_SESSION``; at the end of the session any
live process that carries it, or that still descends from this one, is a process some test
left running (a fork server, a worker, a tracker): the run fails, naming each and the test
during which it started, and they are killed.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
from processes import SESSION, describe, kill_all, live_descendants, marked, new_mark, wait_until_gone

_MARK = pytest.StashKey[str]()
GRACE_S = float(os.environ.get("SSLKIT_TEST_GRACE_S", "20"))  # a process whose job ended may take a moment to notice


def pytest_configure(config) -> None:
    mark = new_mark()
    config.stash[_MARK] = mark
    outer = os.environ.get(SESSION)  # a session started by a test of another: both checks see its processes
    os.environ[SESSION] = f"{outer}:{mark}" if outer else mark


def _stop_own_helpers() -> None:
    """End the helpers this process started for itself, which would end with it anyway: multiprocessing's
    fork server and resource tracker, and the W&B service, so that only what tests left behind remains."""
    gc.collect()
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()
    from multiprocessing import forkserver, resource_tracker

    for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            stop()


def _leftovers(mark: str) -> list:
    found = {proc.pid: proc for proc in marked(mark, var=SESSION)}
    found.update({proc.pid: proc for proc in live_descendants()})
    return list(found.values())


def pytest_sessionfinish(session, exitstatus) -> None:
    mark = session.config.stash.get(_MARK, None)
    if mark is None or not sys.platform.startswith("linux"):
        return
    _stop_own_helpers()
    left = wait_until_gone(lambda: _leftovers(mark), GRACE_S)
    if not left:
        return
    text = describe(left)
    kill_all(left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"{len(left)} process(es) started by the tests were still running {GRACE_S:.0f} s after the "
               f"session ended (now killed); whatever started them must end them:\n{text}")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", "processes left behind", red=True)
        reporter.write_line(message)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = 1
