"""Run a sharding job: units over ranks, ranks over worker processes, resumable, one manifest.

    summary = run_source(WsiSource(...), "shards/wsi", workers=8)

1. The source lists its units (slides, tiles, runs of images) in a fixed order; every rank
   computes the same list and takes its share (``partition``: largest first, to the rank
   with the least work so far, so ranks finish together). Rank and world size come from the
   arguments, else from ``RANK``/``WORLD_SIZE`` (torchrun, Accelerate), ``SLURM_PROCID``/
   ``SLURM_NTASKS``, or Open MPI's variables.
2. Units already recorded as done in the journal (``sslkit.sharding.core.journal``) are skipped;
   a unit cut short is restarted where its final samples end; failed units are retried.
3. Worker processes (one per slot, from a fork server) pull units one at a time and write
   their own shards; a worker that dies (a crashing decoder, the OOM killer) fails the unit it
   was on, and the units whose shard it had not finished are handed out again. Workers end
   with the job's process, however it ends.
4. The rank that finds every unit of the job done or failed writes ``manifest.json``. The
   command exits with ``FAILED_INPUTS_EXIT`` (3) when any input of its share failed, unless
   ``--allow-failures`` (``exit_on_failures``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from sslkit import dist
from sslkit.atomic import write_json
from sslkit.errors import UsageError
from sslkit.shardformat import MANIFEST_NAME, build_manifest, merge_image_info, write_manifest
from sslkit.sharding.core.journal import JOURNAL_DIR, JobState, load_state, stale_files
from sslkit.sharding.core.pool import Display, Pool
from sslkit.sharding.core.source import Source, Unit

# ---------------------------------------------------------------- ranks and shares


def job_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int, str]:
    """(rank, world size, where they came from): the arguments, else the launcher's environment
    (``sslkit.dist.launch_rank``), else 0 of 1."""
    origin = "arguments"
    if rank is None and world_size is None:
        try:
            rank, world_size, origin = dist.launch_rank() or (0, 1, "default")
        except ValueError as err:
            raise UsageError(f"{err}; fix the launcher's environment or pass --rank and --world-size.") from None
    if rank is None or world_size is None:
        raise UsageError("Give both --rank and --world-size, or neither (then the launcher's environment is used).")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"Rank {rank} of world size {world_size} is impossible; ranks run from 0 to world size - 1.")
    return rank, world_size, origin


def partition(units: list[Unit], world_size: int) -> list[list[int]]:
    """Unit indices per rank: largest cost first, each to the rank with the least so far (ties: lower rank).

    Deterministic for a given unit list, so every rank computes the same shares without talking.
    """
    loads = [0.0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(units)), key=lambda i: (-units[i].cost, i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(i)
        loads[rank] += units[i].cost
    return [sorted(share) for share in shares]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- the job folder


@contextmanager
def _rank_lock(out_dir: Path, rank: int) -> Iterator[None]:
    path = out_dir / JOURNAL_DIR / f"rank-{rank:03d}.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"Another `sslkit shard` process is writing rank {rank} of {out_dir}; wait for it to "
                             "finish, or give this job another --out folder.") from None
        yield


def _plan(source: Source) -> dict[str, Any]:
    return {"kind": source.kind, "params": source.params(), "encode": source.encode,
            "quality": source.quality, "classes": source.classes}


def _check_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    """Record the job's settings on first use; refuse to mix shards made with other settings."""
    path = out_dir / JOURNAL_DIR / "plan.json"
    if not path.exists():
        write_json(path, plan)
    recorded = json.loads(path.read_text(encoding="utf-8"))
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as stored
    if recorded != plan:
        diff = _first_difference(recorded, plan)
        raise UsageError(f"{out_dir} holds shards made with other settings ({diff}); shard into a new --out "
                         "folder, or delete this one to start over.")


def _first_difference(old: Any, new: Any, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    return f"{where or 'settings'}: {old!r} before, {new!r} now"




# ---------------------------------------------------------------- the job


def run_source(source: Source, out_dir: str | Path, *, workers: Optional[int] = None, shard_size: int = 1000,
               rank: Optional[int] = None, world_size: Optional[int] = None, progress: bool = True,
               command: Optional[str] = None) -> dict[str, Any]:
    """Shard this rank's share of ``source`` into ``out_dir``; see the module docstring.

    ``workers``: processes (default: the CPUs this process may use, at most one per unit;
    0 runs in this process). Returns ``{"rank", "world_size", "units", "units_before",
    "units_done", "units_failed", "samples", "seconds", "samples_per_s", "failed", "inputs_failed",
    "manifest"}``: counts are this rank's (``units_before``: already done by an earlier
    run); ``inputs_failed`` counts this rank's failed units and items, earlier runs' included, and
    inputs that could not be listed; ``manifest`` is None while other ranks still have units to finish.
    """
    start = time.monotonic()
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1 sample per shard, got {shard_size}.")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be 0 (in this process) or more, got {workers}.")
    rank, world_size, origin = job_rank(rank, world_size)
    out = Path(out_dir)
    (out / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
    command = command if command is not None else shlex.join(sys.argv)
    with _rank_lock(out, rank):
        _check_plan(out, _plan(source))
        units = source.units()
        _check_unique(units)
        mine = [units[i] for i in partition(units, world_size)[rank]]
        state = load_state(out)
        for path in stale_files(out, f"{source.kind}-r{rank:03d}-w", state):
            path.unlink(missing_ok=True)
        todo = [(u, state.final.get(u.id, 0)) for u in mine if not state.done(u.id)]
        before = {u.id: state.final.get(u.id, 0) for u in mine}
        if todo:
            (out / MANIFEST_NAME).unlink(missing_ok=True)  # the set is about to change
        n_workers = min(available_cpus() if workers is None else workers, len(todo))
        if world_size > 1:
            print(f"sslkit shard {source.kind}: rank {rank} of {world_size} (from {origin}): "
                  f"{len(mine)} of {len(units)} {_noun(source, 'unit')}s, {len(todo)} to do.", flush=True)
        display = Display(total=len(todo), slots=max(n_workers, 1), enabled=progress,
                          unit_noun=_noun(source, "unit"), sample_noun=_noun(source, "sample"))
        try:
            Pool(source, out, rank=rank, shard_size=shard_size, state=state, todo=todo, workers=n_workers,
                 display=display).run()
        finally:
            display.close()
        state = load_state(out)
        manifest = _maybe_manifest(source, out, units, state, command=command, shard_size=shard_size)
    seconds = time.monotonic() - start
    records = [state.units[u.id] for u, _ in todo if u.id in state.units]
    share = [state.units[u.id] for u in mine if u.id in state.units]  # this run's and earlier runs'
    samples = sum(state.final.get(u.id, 0) - before[u.id] for u in mine)
    summary = {
        "rank": rank, "world_size": world_size, "units": len(mine), "units_before": len(mine) - len(todo),
        "units_done": sum(r["status"] == "done" for r in records),
        "units_failed": sum(r["status"] == "failed" for r in records),
        "samples": samples, "seconds": round(seconds, 3), "samples_per_s": round(samples / max(seconds, 1e-9), 2),
        "failed": [{"source": r["path"], "reason": r.get("reason", "")} for r in records if r["status"] == "failed"],
        "inputs_failed": (sum(r["status"] == "failed" for r in share) + sum(len(r.get("failed", [])) for r in share)
                          + len(getattr(source, "failed", None) or [])),
        "manifest": manifest,
    }
    _print_summary(source, out, summary, state, units)
    return summary


def _noun(source: Source, what: str) -> str:
    return getattr(source, f"{what}_noun", what)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _check_unique(units: list[Unit]) -> None:
    seen: set[str] = set()
    for unit in units:
        if unit.id in seen:
            raise UsageError(f"Two inputs map to the same unit id {unit.id!r} (one is {unit.path}); rename one.")
        seen.add(unit.id)


def _maybe_manifest(source: Source, out: Path, units: list[Unit], state: JobState, *, command: str,
                    shard_size: int) -> Optional[dict]:
    """Write manifest.json when every unit of the job is journaled done or failed; else None."""
    if any(u.id not in state.units for u in units):
        return None
    shards = [{k: state.shards[name][k] for k in ("name", "samples", "bytes", "sha256")}
              for name in sorted(state.shards)]
    labels: dict[int, int] = {}
    image: Optional[dict] = None
    for record in state.shards.values():
        for label, n in record.get("labels", {}).items():
            labels[int(label)] = labels.get(int(label), 0) + int(n)
        image = merge_image_info(image, record.get("image"))
    listed = {u.id for u in units}
    records = [state.units[u.id] for u in units] + [r for i, r in sorted(state.units.items()) if i not in listed]
    sources, failed = [], []
    for r in records:
        entry = {"id": r["id"], "path": r["path"], "status": r["status"], "samples": r["samples"], **r["info"]}
        if r["status"] == "failed":
            entry["reason"] = r.get("reason", "")
            failed.append({"source": r["path"], "reason": entry["reason"]})
        sources.append(entry)
        failed.extend(r.get("failed", []))
    failed.extend(getattr(source, "failed", None) or [])
    params = dict(source.params(), encode=source.encode, quality=source.quality, shard_size=shard_size)
    manifest = build_manifest(kind=source.kind, command=command, shards=shards, classes=source.classes,
                              label_counts=labels, image=image, sources=sources, failed=failed, params=params)
    write_manifest(out, manifest)
    return manifest


def _print_summary(source: Source, out: Path, summary: dict, state: JobState, units: list[Unit]) -> None:
    unit, sample = _noun(source, "unit"), _noun(source, "sample")
    head = f"sslkit shard {source.kind}" + (f" (rank {summary['rank']})" if summary["world_size"] > 1 else "")
    print(f"{head}: {_count(summary['units_done'], unit)} done, {summary['units_failed']} failed, "
          f"{summary['units_before']} already done; {_count(summary['samples'], sample)} in "
          f"{summary['seconds']:.1f} s ({summary['samples_per_s']:.1f} {sample}s/s).")
    for item in summary["failed"][:20]:
        print(f"  failed: {item['source']}: {item['reason']}")
    if len(summary["failed"]) > 20:
        print(f"  ... and {len(summary['failed']) - 20} more (the manifest's 'failed' lists them all).")
    manifest = summary["manifest"]
    if manifest is not None:
        print(f"Manifest: {out / MANIFEST_NAME}: {manifest['num_samples']} {sample}s in {len(manifest['shards'])} "
              f"shards; {len(manifest['failed'])} failed item(s) recorded.")
    else:
        waiting = sum(u.id not in state.units for u in units)
        print(f"{waiting} of {len(units)} {unit}s are not final yet (other ranks are at work, or were stopped): "
              f"the last rank to finish writes {out / MANIFEST_NAME}; re-running a rank resumes it.")


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """The flags every ``sslkit shard`` command shares."""
    group = parser.add_argument_group("parallel and resumable")
    group.add_argument("--workers", type=int, default=None,
                       help="worker processes (default: one per available CPU; 0 = in this process)")
    group.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    group.add_argument("--rank", type=int, default=None,
                       help="this process's rank (default: RANK, SLURM_PROCID or OMPI_COMM_WORLD_RANK, else 0)")
    group.add_argument("--world-size", type=int, default=None,
                       help="number of ranks (default: WORLD_SIZE, SLURM_NTASKS or OMPI_COMM_WORLD_SIZE, else 1)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars (the summary is printed)")
    group.add_argument("--allow-failures", action="store_true",
                       help=f"exit 0 even when inputs failed (default: exit {FAILED_INPUTS_EXIT} after writing "
                            "everything else and the manifest)")


FAILED_INPUTS_EXIT = 3  # `sslkit shard` wrote everything it could, but some inputs failed


def exit_on_failures(summaries: list[dict], args: argparse.Namespace) -> None:
    """Exit with ``FAILED_INPUTS_EXIT`` when any input failed, unless ``--allow-failures`` was given, so that
    a pipeline (SLURM, make, CI) sees it. Called after the shards and the manifest are written."""
    failed = sum(summary["inputs_failed"] for summary in summaries)
    if failed and not args.allow_failures:
        print(f"sslkit shard: {_count(failed, 'input')} failed (listed above and in the manifest's 'failed'); "
              f"everything else is written. Exit status {FAILED_INPUTS_EXIT}: fix or remove those inputs and run "
              "the same command again (finished work is kept), or pass --allow-failures to exit 0.",
              file=sys.stderr)
        raise SystemExit(FAILED_INPUTS_EXIT)


def runner_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``run_source`` keyword arguments from the flags of ``add_runner_args``."""
    return {"workers": args.workers, "shard_size": args.shard_size, "rank": args.rank,
            "world_size": args.world_size, "progress": not args.no_progress}
