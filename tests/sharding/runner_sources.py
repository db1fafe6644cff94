"""Sources for the runner tests, importable by name in spawned worker processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

from sslkit.sharding.core.source import Progress, Sample, Unit, UnitError
from sslkit.sharding.synthetic import SyntheticSource


class FailingSource(SyntheticSource):
    """Unit ``bad`` yields ``after`` samples, then raises; with ``crash`` its worker segfaults instead."""

    def __init__(self, *, bad: int, after: int, crash: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.bad, self.after, self.crash = bad, after, crash

    def produce(self, unit: Unit, *, skip: int, progress: Progress) -> Iterable[Sample]:
        for n, sample in enumerate(super().produce(unit, skip=skip, progress=progress)):
            if unit.payload[0] == self.bad * self.chunk and n == self.after:
                if self.crash:
                    os.kill(os.getpid(), signal.SIGSEGV)
                raise UnitError(f"{unit.path} is damaged after {n} crops")
            yield sample
