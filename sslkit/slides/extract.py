"""``sslkit extract ENCODER (--shards DIR | --slides SLIDE...) --out DIR``: one feature bag per slide.

    sslkit extract runs/demo --slides slides/ --out bags/demo --mpp 0.5 --tile 256
    sslkit extract demo.safetensors --shards shards/wsi --out bags/demo --pt
    sslkit extract timm:resnet50 --weights resnet50.safetensors --slides @slides.txt --out bags/r50
    accelerate launch --num_processes 4 -m sslkit extract runs/demo --slides slides/ --out bags/demo

Writes ``OUT/<slide>.h5`` (layout: ``sslkit.slides.bags``), with ``--pt`` also
``OUT/pt_files/<slide>.pt``, and ``OUT/manifest.json``: the encoder, the settings, and per slide
``{"status": "done" | "failed", "tiles", "path" (the slide), "bag" (the file), "error"}``, plus
each rank's last run (tiles/s, ``data_wait_share``).

- Tiles: ``--slides`` plans and reads them as ``sslkit shard wsi`` does (same flags, same
  tissue rule, same level-0 corners) without writing shards; ``--shards`` reads the tiles a
  ``sslkit shard wsi`` folder holds. Encoders and how they see a tile: ``sslkit.slides.encoders``.
- Ranks: under ``accelerate launch`` or ``torchrun`` (``RANK``/``WORLD_SIZE``) each process takes
  its share of the slides (``partition``: largest first, no slide twice) and the GPU
  ``LOCAL_RANK``; the ranks do not talk to each other.
- Pipeline: DataLoader workers each take whole slides, decode their tiles, resize them to the
  encoder's input (uint8) and send them in chunks of ``--batch-size`` tiles of one slide; the
  main process scales, normalises and embeds each chunk on the device (bf16 autocast when the
  launcher's mixed precision says bf16, on a GPU) and writes a slide's bag when its last
  chunk is embedded, so memory holds only the slides in flight. ``data_wait_share`` = time
  spent waiting for the loader / the run's wall time.
- Resume: a slide whose bag is there and readable is skipped; files are written under a
  temporary name and renamed, so a killed run leaves no half bag, and a slide it was working
  on is done again. Each rank appends a record per slide to ``OUT/.extract/rank-NNN.jsonl``;
  every rank merges all records into ``manifest.json`` (under a file lock) when it ends, so
  the last rank to end writes the whole job's. The settings and encoder are recorded on first
  use; a run with others into the same folder is refused.
- A slide that cannot be read (damaged file, no tissue) is recorded as failed with the reason,
  and the others go on; the command then exits with status 3 (``--allow-failures``: 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sslkit.errors import UsageError

FAILED_INPUTS_EXIT = 3  # as `sslkit shard` (sslkit.sharding.core.runner): everything else written, inputs failed
STATE_DIR = ".extract"
MANIFEST = "manifest.json"
FORMAT = "sslkit-bags/1"


# ---------------------------------------------------------------- settings and records


def _check_settings(out: Path, settings: dict) -> None:
    """Record the job's settings on first use; refuse to mix bags made with others."""
    from sslkit.atomic import write_json
    from sslkit.sharding.core.runner import _first_difference

    path = out / STATE_DIR / "settings.json"
    if not path.is_file():
        write_json(path, settings)
    recorded = json.loads(path.read_text(encoding="utf-8"))
    settings = json.loads(json.dumps(settings))
    if recorded != settings:
        raise UsageError(f"{out} holds bags made with another encoder or other settings "
                         f"({_first_difference(recorded, settings)}); extract into a new --out folder, or delete "
                         "this one to start over.")


class Records:
    """This rank's records, one JSON line per slide, appended (and flushed) as each slide ends.

    No fsync: a bag is renamed into place before its record is written, and a bag found
    without a record is recorded on the next run (``_todo``), so a lost line loses nothing."""

    def __init__(self, out: Path, rank: int) -> None:
        import threading

        self.path = out / STATE_DIR / f"rank-{rank:03d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # the main thread records failures, the writer thread bags

    def add(self, record: dict) -> None:
        with self.lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**record, "time": time.time()}) + "\n")


def read_records(out: Path) -> tuple[dict[str, dict], list[dict]]:
    """Every rank's records: the latest per slide, and the latest run record of each rank file."""
    slides: dict[str, dict] = {}
    runs: list[dict] = []
    for path in sorted((out / STATE_DIR).glob("rank-*.jsonl")):
        last_run = None
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if "run" in record:
                last_run = record["run"]
            elif record.get("slide") and record["time"] >= slides.get(record["slide"], {}).get("time", 0):
                slides[record["slide"]] = record
        if last_run is not None:
            runs.append(last_run)
    return slides, runs


def merge_manifest(out: Path, *, head: dict, failed_inputs: list[dict]) -> dict:
    """``OUT/manifest.json`` from every rank's records (and the previous manifest's), written atomically
    under a lock; a "done" slide whose bag is gone is dropped."""
    import fcntl

    from sslkit.atomic import write_json

    with open(out / STATE_DIR / "manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = {}
        if (out / MANIFEST).is_file():
            try:
                previous = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("slides", {})
            except json.JSONDecodeError:
                previous = {}
        records, runs = read_records(out)
        slides = {sid: entry for sid, entry in previous.items() if sid not in records}
        for sid, record in records.items():
            slides[sid] = {k: v for k, v in record.items() if k not in ("slide", "time")}
        slides = {sid: e for sid, e in sorted(slides.items())
                  if e["status"] != "done" or (out / e.get("bag", f"{sid}.h5")).is_file()}
        done = sum(e["status"] == "done" for e in slides.values())
        manifest = {"format": FORMAT, **head, "num_slides": len(slides), "done": done,
                    "failed": len(slides) - done, "tiles": sum(e.get("tiles", 0) for e in slides.values()),
                    "slides": slides, "failed_inputs": failed_inputs,
                    "runs": sorted(runs, key=lambda r: r.get("rank", 0))}
        write_json(out / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- the job


def resolve_precision(precision: str, device: Any) -> str:
    """"no", "bf16" or "fp16". ``auto``: the launcher's mixed precision (``ACCELERATE_MIXED_PRECISION``)
    on a GPU, full precision on the CPU."""
    if precision == "auto":
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() if device.type == "cuda" else "no"
    if precision not in ("no", "bf16", "fp16"):
        raise UsageError(f"--precision must be auto, no, bf16 or fp16, got {precision!r}.")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a GPU; use bf16 or no on the CPU.")
    return precision


def default_device() -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _bag_attrs(job: Any, info: dict, source: Any, encoder: Any) -> dict:
    from sslkit.shardformat import _sslkit_version
    from sslkit.slides.tiles import tile_level0

    target, level0 = float(info["mpp"]), float(info["level0_mpp"])
    return {"patch_size": int(source.tile), "patch_size_level0": tile_level0(info, source.tile),
            "target_mpp": target, "level0_mpp": level0, "slide_id": job.id, "slide_path": job.path,
            "encoder": encoder.identity, "feature_kind": encoder.feature_kind, "sslkit_version": _sslkit_version(),
            "target_magnification": round(10.0 / target, 4), "level0_magnification": round(10.0 / level0, 4),
            "overlap": int(source.overlap)}


def _todo(out: Path, jobs: list, mine: list[int], records: Records, *, pt: bool) -> list[int]:
    """This rank's slides without a readable bag. A bag found without a record (a run killed between
    the rename and the record) is recorded now, and with ``pt`` a missing .pt is written from its bag;
    temporary files of this rank's slides are removed."""
    from sslkit.slides.bags import bag_rows, load_bag, write_pt

    known, _ = read_records(out)
    todo = []
    for i in mine:
        job = jobs[i]
        for stale in [*out.glob(f".{job.id}.tmp-*"), *(out / "pt_files").glob(f".{job.id}.tmp-*")]:
            stale.unlink(missing_ok=True)
        rows = bag_rows(out / f"{job.id}.h5")
        if rows is None:
            todo.append(i)
            continue
        if known.get(job.id, {}).get("status") != "done":
            records.add({"slide": job.id, "status": "done", "tiles": rows, "path": job.path, "bag": f"{job.id}.h5"})
        if pt and not (out / "pt_files" / f"{job.id}.pt").is_file():
            write_pt(out / "pt_files" / f"{job.id}.pt", load_bag(out / f"{job.id}.h5")[0])
    return todo


def extract_bags(encoder: Any, source: Any, out: str | Path, *, batch_size: int = 64, workers: Optional[int] = None,
                 pt: bool = False, precision: str = "auto", device: Any = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None, progress: bool = True) -> dict[str, Any]:
    """Write this rank's share of ``source``'s slides as bags in ``out``; see the module notes.

    ``encoder``: a ``TileEncoder``; ``source``: ``SlideFiles`` or ``ShardTiles``. ``workers``:
    DataLoader worker processes (default: the CPUs this process may use, at most 4; 0 reads in
    this process). Returns this rank's summary: slides done, failed (with reasons) and skipped,
    tiles, seconds, tiles/s, ``data_wait_share``, and the merged manifest.
    """
    import torch

    from sslkit.sharding.core.runner import available_cpus, job_rank, partition
    from sslkit.sharding.core.source import Unit

    out = Path(out)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}.")
    rank, world_size, _ = job_rank(rank, world_size)
    device = torch.device(device) if device is not None else default_device()
    precision = resolve_precision(precision, device)
    workers = min(4, available_cpus()) if workers is None else workers
    if workers < 0:
        raise UsageError(f"--workers must be 0 (read in this process) or more, got {workers}.")
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    head = {"encoder": encoder.identity, "encoder_sha256": encoder.sha256, "encoder_variant": encoder.variant,
            "feature_kind": encoder.feature_kind, "source": source.kind,
            "settings": {**source.settings(), "input_size": encoder.size, "precision": precision}}
    _check_settings(out, {k: head[k] for k in ("encoder_sha256", "encoder_variant", "feature_kind", "settings")})
    jobs = source.jobs()
    mine = partition([Unit(j.id, j.path, j.cost) for j in jobs], world_size)[rank]
    records = Records(out, rank)
    todo = _todo(out, jobs, mine, records, pt=pt)
    run = _Run(encoder, source, out, jobs, records, batch_size=batch_size, workers=workers, pt=pt,
               precision=precision, device=device, progress=progress and rank == 0,
               label=f"rank {rank} " if world_size > 1 else "")
    stats = run.go(todo)
    stats.update(rank=rank, world_size=world_size, skipped=len(mine) - len(todo), device=str(device),
                 precision=precision, workers=workers, batch_size=batch_size)
    records.add({"run": {k: v for k, v in stats.items() if k != "failures"}})
    failed_inputs = list(getattr(source, "failed", []))
    manifest = merge_manifest(out, head=head, failed_inputs=failed_inputs)
    stats["failed_inputs"] = len(failed_inputs) if rank == 0 else 0
    return {**stats, "manifest": manifest}


class _Writer:
    """One background thread that writes finished slides while the model embeds the next ones; at
    most ``backlog`` slides wait for it (their features are in memory). An error raised there is
    raised again in the caller at the next ``submit`` or ``drain``."""

    def __init__(self, backlog: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.backlog, self.futures = ThreadPoolExecutor(1, thread_name_prefix="bags"), backlog, []

    def submit(self, fn: Any, *args: Any) -> None:
        self.futures.append(self.pool.submit(fn, *args))
        self.drain(self.backlog)

    def drain(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are outstanding."""
        while len(self.futures) > keep:
            self.futures.pop(0).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _Run:
    """One rank's pass over its slides: the loader, the model, the bags (``extract_bags``)."""

    def __init__(self, encoder: Any, source: Any, out: Path, jobs: list, records: Records, *, batch_size: int,
                 workers: int, pt: bool, precision: str, device: Any, progress: bool, label: str) -> None:
        self.encoder, self.source, self.out, self.jobs, self.records = encoder, source, out, jobs, records
        self.batch_size, self.workers, self.pt, self.precision, self.device = batch_size, workers, pt, precision, device
        self.progress, self.label = progress, label
        self.pending: dict[int, dict] = {}  # slide index -> features, coords, info, bar of a slide in flight
        self.done, self.failures, self.tiles = 0, [], 0  # done and tiles: counted by the writer thread
        self.writer = _Writer(backlog=2)

    def loader(self, todo: list[int]) -> Any:
        from torch.utils.data import DataLoader

        from sslkit.slides.tiles import SlideChunks

        dataset = SlideChunks(self.source, [(i, self.jobs[i]) for i in todo], self.encoder.pixels,
                              self.batch_size)
        workers = min(self.workers, len(todo))
        if workers and hasattr(self.source, "preload"):
            self.source.preload()
        return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
                          prefetch_factor=4 if workers else None)

    def go(self, todo: list[int]) -> dict[str, Any]:
        import torch
        from tqdm.auto import tqdm

        self.encoder.to(self.device)
        autocast = (torch.autocast(device_type=self.device.type,
                                   dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
                    if self.precision != "no" else contextlib.nullcontext())
        self.bar = tqdm(total=len(todo), desc=f"{self.label}slides", unit="slide", disable=not self.progress,
                        dynamic_ncols=True)
        start, wait = time.perf_counter(), 0.0
        try:
            items = iter(self.loader(todo)) if todo else iter(())
            while True:
                tick = time.perf_counter()
                item = next(items, None)
                wait += time.perf_counter() - tick
                if item is None:
                    break
                with torch.inference_mode(), autocast:
                    self.take(item)
            self.writer.drain(0)
        finally:
            self.writer.close()
            for state in self.pending.values():
                state["bar"].close()
            self.bar.close()
        seconds = time.perf_counter() - start
        return {"slides_done": self.done, "slides_failed": len(self.failures), "failures": self.failures,
                "tiles": self.tiles, "seconds": round(seconds, 3),
                "tiles_per_s": round(self.tiles / max(seconds, 1e-9), 2),
                "data_wait_share": round(wait / seconds, 4) if seconds > 0 else 0.0}

    def take(self, item: dict) -> None:
        """One loader item: embed a chunk (and finish its slide on the last one), or record a failure.
        Features stay on the device until the slide's last chunk, so no chunk waits for a copy back."""
        from tqdm.auto import tqdm

        index, job = item["slide"], self.jobs[item["slide"]]
        if item.get("error") is not None:
            state = self.pending.pop(index, None)
            if state is not None:
                state["bar"].close()
            self.fail(job, item["error"])
            return
        if index not in self.pending:
            taken = {state["slot"] for state in self.pending.values()}
            slot = next(s for s in range(1, len(taken) + 2) if s not in taken)
            bar = tqdm(total=item["total"], desc=job.id, unit="tile", leave=False, disable=not self.progress,
                       position=slot, dynamic_ncols=True)
            self.pending[index] = {"features": [], "coords": [], "info": item["info"], "bar": bar, "slot": slot}
        state = self.pending[index]
        images = item["images"].to(self.device, non_blocking=True)
        state["features"].append(self.encoder.embed(images).float())
        state["coords"].append(item["coords"].numpy())
        state["bar"].update(len(images))
        if item["last"]:
            import torch

            state = self.pending.pop(index)
            features = torch.cat(state["features"]).cpu().numpy()
            self.writer.submit(self.finish, index, state, features, np.concatenate(state["coords"]))

    def finish(self, index: int, state: dict, features: np.ndarray, coords: np.ndarray) -> None:
        """Write a slide's bag (and .pt) and its record; runs on the writer thread, beside the model."""
        from sslkit.slides.bags import write_bag, write_pt

        job = self.jobs[index]
        order = np.lexsort((coords[:, 0], coords[:, 1]))  # rows by (y, x)
        features, coords = features[order], coords[order]
        write_bag(self.out / f"{job.id}.h5", features, coords, _bag_attrs(job, state["info"], self.source,
                                                                           self.encoder))
        if self.pt:
            write_pt(self.out / "pt_files" / f"{job.id}.pt", features)
        self.records.add({"slide": job.id, "status": "done", "tiles": len(features), "path": job.path,
                          "bag": f"{job.id}.h5", "dim": int(features.shape[1])})
        state["bar"].close()
        self.done, self.tiles = self.done + 1, self.tiles + len(features)
        self.bar.update(1)

    def fail(self, job: Any, reason: str) -> None:
        self.records.add({"slide": job.id, "status": "failed", "tiles": 0, "path": job.path, "error": reason})
        self.failures.append({"slide": job.id, "path": job.path, "error": reason})
        self.bar.update(1)


# ---------------------------------------------------------------- command line

_SLIDE_FLAGS = {"mpp": 0.5, "tile": 256, "overlap": 0, "min_tissue": 0.5, "mpp_override": None,
                "mpp_tolerance": None, "reader": "auto"}


def build_source(args: argparse.Namespace) -> Any:
    """``SlideFiles`` for ``--slides``, ``ShardTiles`` for ``--shards`` (which refuses the tiling flags)."""
    from sslkit.sharding.wsi.slides import MPP_TOLERANCE
    from sslkit.slides.tiles import ShardTiles, SlideFiles

    given = [k for k in _SLIDE_FLAGS if getattr(args, k) is not None]
    if args.shards is not None:
        if given or args.recursive:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in given) or "--recursive"
            raise UsageError(f"{flags} tile slides; the shards in {args.shards} are tiled already (their manifest "
                             "says how): drop them, or give --slides.")
        return ShardTiles(args.shards)
    value = {k: getattr(args, k) if getattr(args, k) is not None else default for k, default in _SLIDE_FLAGS.items()}
    value["mpp_tolerance"] = value["mpp_tolerance"] if value["mpp_tolerance"] is not None else MPP_TOLERANCE
    return SlideFiles(args.slides, recursive=args.recursive, **value)


def _cmd_extract(args: argparse.Namespace) -> None:
    from sslkit.slides.encoders import load_encoder, parse_model_args

    source = build_source(args)
    encoder = load_encoder(args.encoder_spec, weights=args.weights, encoder=args.encoder, features=args.features,
                           input_size=args.input_size, model_args=parse_model_args(args.model_arg))
    summary = extract_bags(encoder, source, args.out, batch_size=args.batch_size, workers=args.workers, pt=args.pt,
                           precision=args.precision, device=args.device, progress=not args.no_progress)
    print(describe(summary, Path(args.out)))
    failed = summary["slides_failed"] + summary["failed_inputs"]
    if failed and not args.allow_failures:
        print(f"sslkit extract: {failed} slide(s) failed (listed above and in the manifest); every other bag is "
              f"written. Exit status {FAILED_INPUTS_EXIT}: fix or remove those slides and run the same command again "
              "(finished bags are kept), or pass --allow-failures to exit 0.", file=sys.stderr)
        raise SystemExit(FAILED_INPUTS_EXIT)


def describe(summary: dict, out: Path) -> str:
    """The lines the command prints: counts, speed, data wait, failures, where the manifest is."""
    head = "sslkit extract" + (f" (rank {summary['rank']})" if summary["world_size"] > 1 else "")
    lines = [f"{head}: {summary['slides_done']} slides done, {summary['slides_failed']} failed, {summary['skipped']} "
             f"already done; {summary['tiles']} tiles in {summary['seconds']:.1f} s ({summary['tiles_per_s']:.1f} "
             f"tiles/s on {summary['device']}, {summary['precision']}; data_wait_share "
             f"{summary['data_wait_share']:.3f})."]
    lines += [f"  failed: {f['path']}: {f['error']}" for f in summary["failures"][:20]]
    manifest = summary["manifest"]
    lines.append(f"Bags in {out}; manifest {out / MANIFEST}: {manifest['done']} slides done, {manifest['failed']} "
                 f"failed, {manifest['tiles']} tiles.")
    return "\n".join(lines)


_EPILOG = """examples:
  sslkit extract runs/demo --slides slides/ --out bags/demo --mpp 0.5 --tile 256
  sslkit extract demo.safetensors --shards shards/wsi --out bags/demo --pt
  sslkit extract timm:resnet50 --weights resnet50.safetensors --slides @slides.txt --out bags/r50
  accelerate launch --num_processes 4 -m sslkit extract runs/demo --slides slides/ --out bags/demo
OUT/<slide>.h5 holds features (N x D), coords (N x 2, level-0 pixels) and attributes; OUT/manifest.json
lists the slides done and failed."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``sslkit extract`` to the command's sub-parsers."""
    p = sub.add_parser("extract", help="per-slide feature bags (h5: features, level-0 coords) from any encoder",
                       description=__doc__.split("\n\n")[0], epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("encoder_spec", metavar="ENCODER", help="a run directory, an exported .safetensors, or "
                   "timm:NAME with --weights FILE")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--slides", nargs="+", metavar="SLIDE", help="slide files, folders of slides, or @list.txt, "
                       "tiled on the fly as `sslkit shard wsi` tiles them")
    where.add_argument("--shards", metavar="DIR", help="a folder written by `sslkit shard wsi`")
    p.add_argument("--out", required=True, help="output folder (<slide>.h5, manifest.json)")
    enc = p.add_argument_group("encoder")
    enc.add_argument("--weights", help="local weights file of a timm:NAME encoder (.safetensors, .pth, .bin)")
    enc.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="keyword for timm.create_model, repeatable (e.g. init_values=1e-5)")
    enc.add_argument("--encoder", choices=("momentum", "query"), help="a run's encoder (default: eval.encoder)")
    enc.add_argument("--features", choices=("backbone", "projector"), default="backbone",
                     help="a run's features (default backbone)")
    enc.add_argument("--input-size", type=int, help="resize tiles to this side (default: the encoder's input size)")
    tiling = p.add_argument_group("tiling (--slides; as `sslkit shard wsi`)")
    tiling.add_argument("--mpp", type=float, help="target um/px of the tiles (default 0.5)")
    tiling.add_argument("--tile", type=int, help="tile side in target pixels (default 256)")
    tiling.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles (default 0)")
    tiling.add_argument("--min-tissue", type=float, help="least tissue fraction of a kept tile (default 0.5)")
    tiling.add_argument("--mpp-override", type=float, help="level 0's um/px for every slide, ignoring its metadata")
    tiling.add_argument("--mpp-tolerance", type=float, help="a level this close to --mpp is read without resizing")
    tiling.add_argument("--reader", choices=("auto", "openslide", "tiffslide"), help="how slides are decoded "
                        "(default auto; see `sslkit shard wsi --help`)")
    tiling.add_argument("--recursive", action="store_true", help="also take slides in sub-folders of SLIDE folders")
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (default 64)")
    run.add_argument("--workers", type=int, help="DataLoader processes reading tiles (default: CPUs, at most 4)")
    run.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                     help="auto (default): the launcher's mixed precision on a GPU, full precision on the CPU")
    run.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when there is a GPU, else cpu)")
    run.add_argument("--pt", action="store_true", help="also write OUT/pt_files/<slide>.pt (CLAM's layout)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--allow-failures", action="store_true",
                     help=f"exit 0 even when slides failed (default: exit {FAILED_INPUTS_EXIT})")
    p.set_defaults(fn=_cmd_extract)
    return p


__all__ = ["add_parser", "build_source", "describe", "extract_bags", "merge_manifest", "read_records"]
