"""Slide tiling throughput: ``sslkit shard wsi`` against a plain loop over OpenSlide's DeepZoomGenerator.

    python bench/shard_wsi.py [--slide ../shared/data/slides/CMU-1-Small-Region.svs] [--copies 8]
                              [--repeats 5] [--scaling-copies 128] [--reader auto|openslide|tiffslide|all]

0. Decoding a whole level 0 of the slide, side by side, median of ``--repeats``: the stored-tile
   reader (``slides.TiffTiles.read``) against OpenSlide's ``read_region``, each from a fresh handle.
1. Per process, side by side, alternating, medians of ``--repeats`` runs: sslkit (``run_source``,
   ``workers=0``: tissue mask, tile reads (one per tile from the decoded-tile cache with the
   default reader, block reads with openslide / tiffslide), JPEG q90, tar shards, journal,
   manifest) on ``--copies`` links to the slide, and DeepZoom producing the SAME tiles (the
   addresses sslkit kept; target mpp = the slide's own, so DeepZoom's top level is ours) in
   the same format, written with sslkit's tar writer (``ShardFiles``: image and JSON meta
   per tile, fsync before rename). The tiles of the first slide are compared before encoding
   ("max diff" 0 = identical). Then the same on one larger slide (``--mosaic``).
2. Workers: ``run_source`` with 1 and with 2 worker processes on ``--scaling-copies`` links;
   "cpu" = CPU-seconds of all processes per wall second, the cores the run actually got.
3. Peak RSS (VmHWM) of the parent and the worker process sharding 1, 8 and 32 links, each
   in a fresh process: it must not grow with the number of slides.

The last line is ``ratio=<sslkit tiles/s / deepzoom tiles/s>`` for the default reader ("auto":
OpenSlide opens, the stored tiles are decoded with tifffile) unless ``--reader`` names another.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from sslkit.shardformat import read_manifest
from sslkit.sharding.core.runner import run_source
from sslkit.sharding.core.writer import ShardFiles, encode_image, sample_fields
from sslkit.sharding.wsi.command import WsiSource
from sslkit.sharding.wsi.slides import TiffTiles, open_slide, slide_mpp

DEFAULT_SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
TILE, MIN_TISSUE, QUALITY = 256, 0.5, 90
SHARD_SIZE = 1000  # samples per tar on both sides (run_source's default)


def links(slide: Path, folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"slide-{i:03d}{slide.suffix}"
        if not path.exists():
            path.symlink_to(slide.resolve())
        paths.append(str(path))
    return paths


def source(paths: list[str], mpp: float, reader: str, mask_dir: str | None = None) -> WsiSource:
    return WsiSource(paths, mpp=mpp, tile=TILE, min_tissue=MIN_TISSUE, encode="jpeg", quality=QUALITY, reader=reader,
                     mask_dir=mask_dir)


def run_sslkit(paths: list[str], mpp: float, reader: str, out: Path, workers: int = 0) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the runner's summary lines
        return run_source(source(paths, mpp, reader, str(out / "masks")), out, workers=workers, progress=False,
                          command="bench")


def kept_addresses(out: Path) -> dict[str, list[tuple[int, int]]]:
    """slide path -> level-0 (x, y) of the tiles sslkit wrote, in order."""
    found: dict[str, list[tuple[int, int]]] = {}
    for shard in read_manifest(out)["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    found.setdefault(meta["path"], []).append((meta["x"], meta["y"]))
    return found


def run_deepzoom(addresses: dict[str, list[tuple[int, int]]], out: Path) -> int:
    """The same tiles through DeepZoomGenerator.get_tile, JPEG-encoded alike, written with sslkit's tar writer."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    out.mkdir(parents=True, exist_ok=True)
    files, n = ShardFiles(out, stem="deepzoom", maxcount=SHARD_SIZE), 0
    for path, corners in addresses.items():
        with openslide.OpenSlide(path) as slide:
            dz = DeepZoomGenerator(slide, tile_size=TILE, overlap=0, limit_bounds=False)
            top = dz.level_count - 1
            for x, y in corners:
                tile = np.asarray(dz.get_tile(top, (x // TILE, y // TILE)))
                ext, data = encode_image(tile, fmt="jpeg", quality=QUALITY)
                key = f"{Path(path).stem}_{x}_{y}"
                files.add(key, sample_fields(ext, data, meta={"path": path, "x": x, "y": y}, key=key))
                n += 1
    files.finish()
    return n


def check_same_tiles(path: str, mpp: float, reader: str, corners: list[tuple[int, int]]) -> int:
    """Largest pixel difference between sslkit's and DeepZoom's tiles of one slide (before encoding)."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    from sslkit.sharding.core.source import Progress

    src = source([path], mpp, reader)
    ours = list(src.produce(src.units()[0], skip=0, progress=Progress()))
    dz = DeepZoomGenerator(openslide.OpenSlide(path), tile_size=TILE, overlap=0, limit_bounds=False)
    assert [(s.meta["x"], s.meta["y"]) for s in ours] == corners
    worst = 0
    for sample in ours:
        theirs = np.asarray(dz.get_tile(dz.level_count - 1, (sample.meta["x"] // TILE, sample.meta["y"] // TILE)))
        diff = np.abs(sample.image.astype(int) - theirs)
        assert diff.mean() < 1.0, f"tile {sample.key} differs from DeepZoom's"  # decoders may differ by a little
        worst = max(worst, int(diff.max()))
    return worst


def mosaic(slide: Path, folder: Path, n: int) -> Path:
    """An n x n mosaic of the slide's level 0 as a tiled pyramidal JPEG TIFF (a larger slide, real pixels)."""
    import tifffile

    handle = open_slide(str(slide), "openslide")
    width, height = handle.dimensions[0]
    mpp = slide_mpp(handle)[0]
    region = handle.read(0, 0, 0, width, height)
    handle.close()
    image = np.tile(region, (n, n, 1))  # (n H, n W, 3)
    path = folder / f"mosaic-{n}x{n}.tif"
    folder.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, k in enumerate((1, 4, 16)):
            level = image[::k, ::k] if k > 1 else image
            tif.write(level, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                      subfiletype=1 if i else 0, resolution=(1e4 / (mpp * k),) * 2, resolutionunit="CENTIMETER",
                      metadata=None)
    return path


def decode_level0(path: str, *, repeats: int) -> None:
    """Print the time to decode the whole level 0: TiffTiles.read against OpenSlide's read_region."""
    import openslide

    def median_ms(read) -> float:
        times = []
        for _ in range(repeats):
            with openslide.OpenSlide(path) as handle:  # fresh handles: nothing decoded yet
                tiles = TiffTiles(path, handle)
                try:
                    start = time.perf_counter()
                    read(tiles, handle)
                    times.append(time.perf_counter() - start)
                finally:
                    tiles.close()
        return 1e3 * statistics.median(times)

    with openslide.OpenSlide(path) as handle:
        width, height = handle.dimensions
    try:
        ours = median_ms(lambda tiles, handle: tiles.read(0, 0, 0, width, height))
    except RuntimeError as err:  # not a tiled RGB TIFF pyramid
        print(f"whole level 0: not decodable from its stored tiles ({err})", flush=True)
        return
    theirs = median_ms(lambda tiles, handle: handle.read_region((0, 0), 0, (width, height)))
    print(f"whole level 0 ({width}x{height}) decoded: TiffTiles.read {ours:.1f} ms, OpenSlide read_region "
          f"{theirs:.1f} ms, ratio {theirs / ours:.2f}  (median of {repeats}, fresh handles)", flush=True)


def level0_mpp(path: str) -> float:
    handle = open_slide(path)
    try:
        return slide_mpp(handle)[0]
    finally:
        handle.close()


def per_process(paths: list[str], work: Path, *, repeats: int, reader: str) -> float:
    """sslkit against DeepZoom in this process, alternating; returns the ratio of tiles/s."""
    mpp = level0_mpp(paths[0])
    tiles = run_sslkit(paths, mpp, reader, work / "ours")["samples"]  # warm-up, and the tile addresses
    addresses = kept_addresses(work / "ours")
    worst = check_same_tiles(paths[0], mpp, reader, addresses[paths[0]])
    ours, theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        assert run_sslkit(paths, mpp, reader, work / "ours")["samples"] == tiles
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert run_deepzoom(addresses, work / "dz") == tiles
        theirs.append(time.perf_counter() - start)
    rate_ours, rate_dz = tiles / statistics.median(ours), tiles / statistics.median(theirs)
    print(f"  reader {reader:9s}: sslkit {rate_ours:7.1f} tiles/s, deepzoom {rate_dz:7.1f} tiles/s, "
          f"ratio {rate_ours / rate_dz:.2f}  ({tiles} tiles, {len(paths)} slides, median of {repeats}, "
          f"max diff {worst})", flush=True)
    return rate_ours / rate_dz


def _cpu_seconds() -> float:
    """CPU seconds of this process, its reaped children, and the workers behind the fork server.

    Workers are children of multiprocessing's fork server, which reaps them: their time shows
    in the server's cutime/cstime (/proc/<pid>/stat fields 16-17), not in RUSAGE_CHILDREN.
    """
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    from multiprocessing import forkserver

    server = getattr(forkserver._forkserver, "_forkserver_pid", None)  # noqa: SLF001 -- a benchmark's peek
    if server is not None and os.path.exists(f"/proc/{server}/stat"):
        with open(f"/proc/{server}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    return total


def scaling(paths: list[str], work: Path, *, reader: str, repeats: int) -> None:
    """Tiles/s of run_source with 1 and 2 worker processes (start-up included), and the CPUs they got.

    cpu = CPU-seconds of all processes / wall seconds: 2 workers can only be ~2x faster when it is ~2.
    """
    mpp = level0_mpp(paths[0])
    runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(repeats):
        for workers in (1, 2):
            start, cpu = time.perf_counter(), _cpu_seconds()
            tiles = run_sslkit(paths, mpp, reader, work / f"w{workers}", workers=workers)["samples"]
            wall = time.perf_counter() - start
            runs[workers].append((tiles / wall, (_cpu_seconds() - cpu) / wall))
    (one, cpu1), (two, cpu2) = ((statistics.median(r[0] for r in runs[w]), statistics.median(r[1] for r in runs[w]))
                                for w in (1, 2))
    print(f"  reader {reader:9s}: 1 worker {one:7.1f} tiles/s (cpu {cpu1:.2f}), 2 workers {two:7.1f} tiles/s "
          f"(cpu {cpu2:.2f}), x{two / one:.2f}; per CPU-second x{(two / cpu2) / (one / cpu1):.2f}  "
          f"({len(paths)} slides, median of {repeats}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})",
          flush=True)


def peak_rss(slide: Path, work: Path, copies: int, reader: str) -> tuple[float, float]:
    """(parent, largest worker) peak RSS in MiB sharding ``copies`` links with 1 worker, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--slide", str(slide), "--_rss", str(copies),
                          "--reader", reader, "--work", str(work)], check=True, capture_output=True, text=True)
    parent, child = out.stdout.strip().splitlines()[-1].split()
    return float(parent), float(child)


def _hwm_mib(pid: int) -> float:
    """VmHWM (peak RSS of the process's own address space; ru_maxrss would carry a forking parent's)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_child(slide: Path, work: Path, copies: int, reader: str) -> None:
    import threading

    paths = links(slide, work / "links", copies)
    peaks: dict[int, float] = {}
    done = threading.Event()

    def watch() -> None:  # the workers' peaks, read while they live
        me = str(os.getpid())
        while not done.wait(0.02):
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                        pid = int(stat.parent.name)
                        peaks[pid] = max(peaks.get(pid, 0.0), _hwm_mib(pid))
                except (OSError, IndexError):
                    continue

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run_sslkit(paths, level0_mpp(paths[0]), reader, work / f"rss{copies}", workers=1)
    done.set()
    watcher.join()
    print(f"{_hwm_mib(os.getpid()):.1f} {max(peaks.values(), default=0.0):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--copies", type=int, default=8, help="slide links per timed run (default 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scaling-copies", type=int, default=128,
                        help="slide links for the worker runs (enough to amortise starting the workers)")
    parser.add_argument("--mosaic", type=int, default=3,
                        help="also time an N x N mosaic of the slide, a larger slide (default 3; 0: skip)")
    parser.add_argument("--reader", choices=("auto", "openslide", "tiffslide", "all"), default="all")
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_rss", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.slide.is_file():
        raise SystemExit(f"Slide {args.slide} not found; pass --slide PATH (e.g. CMU-1-Small-Region.svs).")
    if args._rss:
        return _rss_child(args.slide, args.work, args._rss, args.reader)
    readers = ["openslide", "tiffslide", "auto"] if args.reader == "all" else [args.reader]
    with tempfile.TemporaryDirectory(prefix="bench-wsi-") as tmp:
        work = Path(tmp)
        paths = links(args.slide, work / "links", max(args.copies, args.scaling_copies))
        print(f"{args.slide.name}: {TILE}x{TILE} tiles at the slide's own mpp, min tissue {MIN_TISSUE}, "
              f"JPEG q{QUALITY}, written to tars")
        decode_level0(str(args.slide), repeats=args.repeats)
        print("per process (sslkit run_source workers=0 vs DeepZoomGenerator loop, same tiles):", flush=True)
        ratios = {r: per_process(paths[:args.copies], work, repeats=args.repeats, reader=r) for r in readers}
        if args.mosaic:
            big = mosaic(args.slide, work / "mosaic", args.mosaic)
            print(f"per process, one larger slide ({args.mosaic}x{args.mosaic} mosaic of the same pixels, "
                  "tiled JPEG TIFF):", flush=True)
            for reader in readers:
                per_process([str(big)], work, repeats=args.repeats, reader=reader)
        print("worker processes:", flush=True)
        for reader in readers:
            scaling(paths[:args.scaling_copies], work, reader=reader, repeats=max(1, args.repeats // 2))
        print("peak RSS (VmHWM), 1 worker process (MiB):", flush=True)
        for reader in readers:
            rss = {n: peak_rss(args.slide, work / f"rss-{reader}", n, reader) for n in (1, 8, 32)}
            print(f"  reader {reader:9s}: " + "; ".join(f"{n} slide{'s' * (n > 1)}: parent {p:.0f}, worker {w:.0f}"
                                                         for n, (p, w) in rss.items()), flush=True)
    print(f"ratio={ratios[readers[-1]]:.2f}")


if __name__ == "__main__":
    main()
