"""Worker processes of a sharding job, and the parent that feeds them and watches them.

Each worker slot is a process (from a fork server, else ``spawn``) with its own ``SlotWriter`` (shards + journal). It
asks for a unit, shards it, asks again; the parent answers from its queue of (unit, skip)
and draws the progress bars from the messages. A worker that dies without saying goodbye
(a decoder's segfault, the OOM killer) is noticed: the unit it was on is journaled as
failed, the units whose samples sat in its unfinished shard are queued again (from their
journaled sample count), its partial shard is removed and a new worker takes the slot.
The other way round, a worker ends as soon as the job's process does, whatever killed it, and
with the workers gone the fork server and the resource tracker end too (``_die_with_job``).
With ``workers=0`` the units run in the calling process, without any of this.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from sslkit.sharding.core.journal import (
    JobState,
    Journal,
    SlotWriter,
    journal_path,
    read_journal,
    slot_stem,
    stale_files,
)
from sslkit.sharding.core.source import Progress, Source, Unit, UnitError

_ADVANCE_EVERY_S = 0.2
_POLL_S = 0.2


def _reason(err: BaseException) -> str:
    return str(err) if isinstance(err, UnitError) else f"{type(err).__name__}: {err}"


class _Sender:
    """Worker -> parent messages ``(kind, slot, *values)``; sample counts go a few times a second."""

    def __init__(self, put: Callable[[tuple], None], slot: int) -> None:
        self.put, self.slot = put, slot
        self.unsent, self.last = 0, time.monotonic()

    def __call__(self, kind: str, *values: Any) -> None:
        if kind == "advance":
            self.unsent += values[0]
            if time.monotonic() - self.last < _ADVANCE_EVERY_S:
                return
            values, self.unsent, self.last = (self.unsent,), 0, time.monotonic()
        elif self.unsent:
            self.put(("advance", self.slot, self.unsent))
            self.unsent, self.last = 0, time.monotonic()
        self.put((kind, self.slot, *values))


def run_unit(source: Source, unit: Unit, skip: int, writer: SlotWriter, send: Callable[..., None]) -> None:
    """Shard one unit into ``writer``. Its errors fail the unit; an OSError on our own output is fatal."""
    send("start", unit.id, skip)
    progress = Progress(lambda kind, value: send(kind, value))
    writer.begin(unit)
    status, reason = "done", None
    try:
        samples = source.produce(unit, skip=skip, progress=progress)
        if not source.handles_skip:
            samples = islice(samples, skip, None)
        for sample in samples:
            writer.write(sample)
            send("advance", 1)
    except OSError as err:
        name = getattr(err, "filename", None)
        if name is not None and str(name).startswith(str(writer.files.out_dir)):
            raise  # our own disk (full, gone, read-only): nothing else can go on either
        status, reason = "failed", _reason(err)
    except Exception as err:  # noqa: BLE001 -- any error of one unit is that unit's failure; the job goes on
        status, reason = "failed", _reason(err)
    writer.end(skipped=skip, status=status, info=progress.details, failed=progress.failed, reason=reason)
    send("end", unit.id, status, reason)


def _die_with_job(job_alive: Any) -> None:
    """End this worker as soon as the job's process ends, whatever ended it (SIGKILL included).

    ``job_alive`` is the reading end of a pipe whose only writing end the job's process holds: the
    kernel closes it when that process dies, and a watcher thread that reads EOF exits the worker.
    The parent's death alone would not do: a worker's parent is the fork server, which lives as long
    as any worker holds its keep-alive pipe, so the fork server, the workers and the resource tracker
    would wait on each other forever. PR_SET_PDEATHSIG is asked for as well (``spawn`` workers are
    children of the job's process, and a signal is quicker than a thread).
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        try:
            while True:
                job_alive.recv_bytes()
        except (EOFError, OSError):
            os._exit(1)  # the job is gone: what this worker was writing is unfinished, as after a kill

    threading.Thread(target=watch, name="sslkit-job-watch", daemon=True).start()


def _slot_writer(source: Source, out_dir: Path, rank: int, slot: int, start_index: int, shard_size: int,
                 emit: Callable[[dict], None]) -> SlotWriter:
    return SlotWriter(out_dir, kind=source.kind, rank=rank, slot=slot, start_index=start_index,
                      maxcount=shard_size, encode=source.encode, quality=source.quality,
                      num_classes=len(source.classes) if source.classes is not None else None, emit=emit)


def _worker(source: Source, out_dir: str, rank: int, slot: int, start_index: int, shard_size: int,
            tasks: Any, messages: Any, job_alive: Any) -> None:
    _die_with_job(job_alive)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    send = _Sender(messages.put, slot)
    writer = _slot_writer(source, Path(out_dir), rank, slot, start_index, shard_size,
                          emit=lambda record: send("journal", record))
    send("ready")
    while (task := tasks.get()) is not None:
        run_unit(source, task[0], task[1], writer, send)
        send("ready")
    writer.close()
    send("exit")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


def _context(source: Source) -> Any:
    """Workers start from a fork server that imported the source's modules once (about 0.35 s of
    imports a worker for slides), else with ``spawn``; never ``fork`` of the job's process,
    whose threads (progress bars, queues) a fork would copy mid-state."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["sslkit.sharding.core.pool", type(source).__module__,
                                *getattr(source, "preload", ())])
    return ctx


class Display:
    """Progress bars: one for the job (final units, samples/s), one per worker slot (its current unit)."""

    def __init__(self, *, total: int, slots: int, enabled: bool, unit_noun: str, sample_noun: str) -> None:
        self.enabled, self.samples, self.sample_noun, self.start = enabled, 0, sample_noun, time.monotonic()
        self.job = tqdm(total=total, desc=f"{unit_noun}s", unit=unit_noun, disable=not enabled, position=0,
                        dynamic_ncols=True)
        self.slots = [tqdm(total=0, desc=f"worker {s}", unit=sample_noun, disable=not enabled, position=s + 1,
                           leave=False, dynamic_ncols=True) for s in range(slots)]

    def start_unit(self, slot: int, unit_id: str, skip: int) -> None:
        bar = self.slots[slot]
        bar.reset(total=None)
        bar.set_description_str(unit_id[:40], refresh=False)
        bar.update(skip)

    def total(self, slot: int, n: int) -> None:
        self.slots[slot].total = n
        self.slots[slot].refresh()

    def advance(self, slot: int, n: int) -> None:
        self.slots[slot].update(n)
        self.samples += n
        rate = self.samples / max(time.monotonic() - self.start, 1e-9)
        self.job.set_postfix_str(f"{self.samples} {self.sample_noun}s, {rate:.1f}/s", refresh=False)

    def unit_final(self, record: dict) -> None:
        self.job.update(1)
        if record["status"] == "failed":
            self.job.write(f"failed: {record['path']}: {record.get('reason', '')}")

    def close(self) -> None:
        for bar in self.slots:
            bar.close()
        self.job.close()


class Pool:
    """Shard ``todo`` = [(unit, skip)] with ``workers`` processes (0: in this process)."""

    def __init__(self, source: Source, out_dir: Path, *, rank: int, shard_size: int, state: JobState,
                 todo: list[tuple[Unit, int]], workers: int, display: Display) -> None:
        self.source, self.out_dir, self.rank, self.shard_size = source, out_dir, rank, shard_size
        self.state, self.display, self.workers = state, display, workers
        self.todo: deque[tuple[Unit, int]] = deque(todo)
        self.units = {unit.id: unit for unit, _ in todo}
        self.ctx = _context(source)
        self.messages: Any = None
        self.procs: dict[int, Any] = {}
        self.tasks: dict[int, Any] = {}
        self.current: dict[int, Optional[str]] = {}
        self.open_units: dict[int, list[str]] = {}  # slot -> units started there and not journaled yet
        self.exited: set[int] = set()
        self.offsets: dict[int, int] = {}  # slot -> its journal's size when its worker started

    def run(self) -> None:
        if self.workers == 0:
            return self._run_inline()
        self.messages = self.ctx.Queue()
        # Only this process holds the writing end: workers see EOF on the reading end when it dies.
        self.job_alive, job_alive_w = self.ctx.Pipe(duplex=False)
        try:
            for slot in range(self.workers):
                self._start(slot)
            while len(self.exited) < len(self.procs):
                try:
                    self._handle(self.messages.get(timeout=_POLL_S))
                except queue.Empty:
                    self._check_workers()
        finally:
            for proc in self.procs.values():
                if proc.is_alive():
                    proc.terminate()
                proc.join()
            job_alive_w.close()
            self.job_alive.close()

    def _run_inline(self) -> None:
        self.current[0], self.open_units[0] = None, []
        send = _Sender(self._handle, 0)
        start = self.state.next_index.get(slot_stem(self.source.kind, self.rank, 0), 0)
        writer = _slot_writer(self.source, self.out_dir, self.rank, 0, start, self.shard_size,
                              emit=lambda record: send("journal", record))
        while self.todo:
            unit, skip = self.todo.popleft()
            run_unit(self.source, unit, skip, writer, send)
        writer.close()

    def _start(self, slot: int) -> None:
        start = self.state.next_index.get(slot_stem(self.source.kind, self.rank, slot), 0)
        self.tasks[slot] = self.ctx.Queue()
        self.current[slot], self.open_units[slot] = None, []
        self.exited.discard(slot)
        path = journal_path(self.out_dir, self.rank, slot)
        self.offsets[slot] = path.stat().st_size if path.exists() else 0
        self.procs[slot] = self.ctx.Process(
            target=_worker, name=f"sslkit-shard-w{slot}", daemon=True,
            args=(self.source, str(self.out_dir), self.rank, slot, start, self.shard_size,
                  self.tasks[slot], self.messages, self.job_alive))
        self.procs[slot].start()

    def _handle(self, message: tuple) -> None:
        kind, slot, *values = message
        if kind == "ready":
            self.tasks[slot].put(self.todo.popleft() if self.todo else None)
        elif kind == "start":
            self.current[slot] = values[0]
            self.open_units[slot].append(values[0])
            self.display.start_unit(slot, values[0], values[1])
        elif kind == "total":
            self.display.total(slot, values[0])
        elif kind == "advance":
            self.display.advance(slot, values[0])
        elif kind == "end":
            self.current[slot] = None
        elif kind == "journal":
            self._journaled(slot, values[0])
        elif kind == "exit":
            self.exited.add(slot)

    def _journaled(self, slot: int, record: dict) -> None:
        self.state.add(record)
        if record.get("type") == "unit":
            if record["id"] in self.open_units.get(slot, []):
                self.open_units[slot].remove(record["id"])
            self.display.unit_final(record)

    def _check_workers(self) -> None:
        for slot, proc in list(self.procs.items()):
            if slot in self.exited or proc.exitcode is None:
                continue
            while True:  # what it said before dying may still be in the pipe
                try:
                    self._handle(self.messages.get(timeout=0.05))
                except queue.Empty:
                    break
            if slot not in self.exited:
                self._recover(slot, proc.exitcode)

    def _recover(self, slot: int, code: int) -> None:
        """A worker died: trust its journal, fail the unit it was on, queue the rest again, restart the slot."""
        path = journal_path(self.out_dir, self.rank, slot)
        for record in read_journal(path, offset=self.offsets[slot]):  # this worker's; messages may be lost
            if record.get("type") == "shard":
                self.state.add(record)
            elif record["id"] in self.open_units[slot]:
                self._journaled(slot, record)
        crashed = self.current.get(slot)
        if crashed is not None:
            unit = self.units[crashed]
            record = {"type": "unit", "id": unit.id, "path": unit.path, "status": "failed",
                      "samples": self.state.final.get(unit.id, 0), "info": {}, "failed": [],
                      "reason": f"the worker process died ({_describe_exit(code)}) while sharding it; the file "
                                "may be damaged or too large for memory (run again to retry it)"}
            journal = Journal(path)
            journal.append(record)
            journal.close()
            self._journaled(slot, record)
        for unit_id in reversed(self.open_units[slot]):
            if unit_id != crashed:
                self.todo.appendleft((self.units[unit_id], self.state.final.get(unit_id, 0)))
        for leftover in stale_files(self.out_dir, slot_stem(self.source.kind, self.rank, slot) + "-", self.state):
            leftover.unlink(missing_ok=True)
        self.procs[slot].join()
        if self.todo:
            self._start(slot)
        else:
            self.exited.add(slot)
