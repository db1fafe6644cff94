"""Shared by the fuzz tests: a deterministic hypothesis profile and a watchdog that turns a hang into a failure."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings

# derandomize + no example database: CI sees the same examples on every run (a failure found once stays found).
# deadline=None: timing on 2 shared cores is noisy; `run_within` below turns a real hang into a failure instead.
settings.register_profile("sslkit-fuzz", derandomize=True, deadline=None, print_blob=True, database=None)
FUZZ = settings.get_profile("sslkit-fuzz")
HANG_S = 15.0  # hundreds of times any example's normal time (milliseconds): only a hang gets near it


def run_within(fn: Callable[[], Any], seconds: float = HANG_S) -> Any:
    """``fn()`` in a daemon thread; its result, or its exception re-raised; fails the test if it hangs."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 -- handed back to the caller as is
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds:.0f} s: a hang")
    if "error" in box:
        raise box["error"]
    return box["value"]
