"""Feature-bag extraction throughput: ``sslkit extract --slides`` against a plain OpenSlide loop.

    python bench/extract.py [--slide ../shared/data/slides/CMU-1-Small-Region.svs] [--copies 64]
                            [--encoder tiny|demo|resnet18] [--mpp 0.5] [--tile 256] [--batch-size 64]
                            [--workers 2] [--repeats 3] [--rss 4,32] [--device cuda --precision bf16]

1. Per process, side by side, alternating, medians of ``--repeats`` runs on ``--copies`` links to
   the slide: sslkit (``extract_bags``, the code path of ``sslkit extract --slides``: tissue
   mask, tile plan, DataLoader workers reading tiles and resizing them to the encoder's input,
   the encoder in the main process, one .h5 bag per slide) against a plain loop in one process: for each slide the
   same plan (``plan_tiles``, timed on this side too), then per tile OpenSlide's
   ``read_region`` at the plan's level (resized to the tile when the level is not at the
   target um/px), the encoder's own transform, and the encoder on batches of the same size
   cut the same way (per slide), the features written to .h5 the same way. Both sides'
   features of the first slide are compared ("max feature diff"; 0 when both readers decode
   the same pixels).
2. Peak RSS (VmHWM) of the main process and of the largest DataLoader worker extracting the
   ``--rss`` numbers of links, each in a fresh process: it must not grow with the slides.

On a GPU (``--device cuda``) both sides run the encoder there; ``data_wait_share`` then says
how much of the run the GPU waited for tiles.

Encoders, random weights saved to a local file and loaded as ``sslkit extract`` loads a timm
model: ``tiny`` (the default), a pre-activation ResNet-18 of width 4 at 32 px, cheap next to
decoding as an encoder on a GPU is, so the data path is what is timed; ``demo``, the
architecture of ``sslkit demo``'s encoder (width 16, 32 px); ``resnet18``, timm's, 224 px,
ImageNet mean/std, which on a CPU is the bottleneck on both sides. The last line is
``ratio=<sslkit tiles/s / plain loop tiles/s>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the sslkit command does before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402
from shard_wsi import DEFAULT_SLIDE, links  # noqa: E402 -- bench/ is on sys.path as a script

from sslkit.sharding.wsi.command import plan_tiles  # noqa: E402
from sslkit.sharding.wsi.slides import open_slide  # noqa: E402
from sslkit.slides.bags import write_bag  # noqa: E402
from sslkit.slides.encoders import TileEncoder, load_encoder  # noqa: E402
from sslkit.slides.extract import extract_bags  # noqa: E402
from sslkit.slides.tiles import SlideFiles  # noqa: E402

ENCODERS = {"tiny": ("preact_resnet18", {"width": 4}), "demo": ("preact_resnet18", {"width": 16}),
            "resnet18": ("resnet18", {})}
MIN_TISSUE = 0.5


def make_encoder(name: str, work: Path) -> TileEncoder:
    """Random weights of ``name``'s architecture in a local file, loaded as ``sslkit extract`` loads timm models."""
    import timm
    from safetensors.torch import save_file

    import sslkit.models  # noqa: F401 -- registers preact_resnet18

    arch, kwargs = ENCODERS[name]
    weights = work / f"{name}.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=0, **kwargs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return load_encoder(f"timm:{arch}", weights=str(weights), model_args=kwargs)


def run_sslkit(encoder: TileEncoder, paths: list[str], out: Path, args: argparse.Namespace) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    source = SlideFiles(paths, mpp=args.mpp, tile=args.tile, min_tissue=MIN_TISSUE)
    return extract_bags(encoder, source, out, batch_size=args.batch_size, workers=args.workers, progress=False,
                        device=args.device, precision=args.precision)


@torch.inference_mode()
def run_plain(encoder: TileEncoder, paths: list[str], out: Path, args: argparse.Namespace) -> int:
    """The plain loop (module docstring): plan, read_region per tile, transform, encoder; one .h5 per slide."""
    import openslide
    from PIL import Image

    tiles, device = 0, torch.device(args.device)
    encoder.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    for path in paths:
        slide = open_slide(path, "openslide")
        try:
            plan, _, _ = plan_tiles(slide, mpp=args.mpp, tile=args.tile, overlap=0, min_tissue=MIN_TISSUE)
        finally:
            slide.close()
        geom, handle = plan.geometry, openslide.OpenSlide(path)
        side = round(args.tile * geom.scale[0])
        corners = [geom.to_level0(x, y) for x, y in plan.tiles.tolist()]
        feats = []
        for start in range(0, len(corners), args.batch_size):
            batch = []
            for x, y in corners[start:start + args.batch_size]:
                image = handle.read_region((x, y), geom.level, (side, side)).convert("RGB")
                if side != args.tile:
                    image = image.resize((args.tile, args.tile), Image.Resampling.BILINEAR)
                batch.append(encoder.pixels(image))
            with autocast:
                feats.append(encoder.embed(torch.stack(batch).to(device)).float().cpu().numpy())
        handle.close()
        write_bag(out / f"{Path(path).stem}.h5", np.concatenate(feats), np.asarray(corners), {"slide_path": path})
        tiles += len(corners)
    return tiles


def first_slide_diff(ours: Path, plain: Path, paths: list[str]) -> float:
    """Largest |difference| between the two sides' features of the first slide, rows matched by corner."""
    from sslkit.slides.bags import load_bag

    name = Path(paths[0]).stem
    f_ours, c_ours, _ = load_bag(ours / f"{name}.h5")
    f_plain, c_plain, _ = load_bag(plain / f"{name}.h5")
    index = {tuple(c): i for i, c in enumerate(c_plain.tolist())}
    rows = [index[tuple(c)] for c in c_ours.tolist()]
    return float(np.abs(f_ours - f_plain[rows]).max())


def per_process(encoder: TileEncoder, paths: list[str], work: Path, args: argparse.Namespace) -> float:
    ours, plain, waits = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        summary = run_sslkit(encoder, paths, work / "ours", args)
        ours.append(summary["tiles"] / (time.perf_counter() - start))
        waits.append(summary["data_wait_share"])
        out = work / "plain"
        out.mkdir(exist_ok=True)
        start = time.perf_counter()
        tiles = run_plain(encoder, paths, out, args)
        plain.append(tiles / (time.perf_counter() - start))
    assert tiles == summary["tiles"], (tiles, summary["tiles"])
    diff = first_slide_diff(work / "ours", work / "plain", paths)
    a, b = statistics.median(ours), statistics.median(plain)
    print(f"sslkit extract: {a:8.1f} tiles/s (data_wait_share {statistics.median(waits):.3f}, {args.workers} "
          f"workers); plain OpenSlide loop: {b:8.1f} tiles/s; ratio {a / b:.2f}  ({tiles} tiles, {len(paths)} "
          f"slides, median of {args.repeats}, max feature diff {diff:.2g})", flush=True)
    return a / b


def _hwm_mib(pid: int) -> float:
    """VmHWM (peak RSS of the process's own address space; ru_maxrss would carry a forking parent's)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_child(args: argparse.Namespace, work: Path, copies: int) -> None:
    """Extract ``copies`` links in this fresh process; print the main process's and the largest worker's peak."""
    import psutil

    paths = links(args.slide, work / "rss-links", copies)
    encoder = make_encoder(args.encoder, work)
    peaks: dict[int, float] = {}
    done = threading.Event()

    def watch() -> None:  # the workers' peaks, read while they live
        while not done.wait(0.02):
            for child in psutil.Process().children(recursive=True):
                peaks[child.pid] = max(peaks.get(child.pid, 0.0), _hwm_mib(child.pid))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    with contextlib.redirect_stdout(io.StringIO()):
        run_sslkit(encoder, paths, work / f"rss-{copies}", args)
    done.set()
    thread.join()
    print(f"{_hwm_mib(os.getpid()):.1f} {max(peaks.values(), default=0.0):.1f}")


def peak_rss(args: argparse.Namespace, work: Path, copies: int) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--slide", str(args.slide), "--encoder", args.encoder, "--mpp", str(args.mpp),
           "--tile", str(args.tile), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--device", args.device, "--precision", args.precision, "--work", str(work), "--_rss", str(copies)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    main_mib, worker_mib = out.stdout.strip().splitlines()[-1].split()
    return float(main_mib), float(worker_mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--copies", type=int, default=64, help="links to the slide per timed run (default 64)")
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="tiny")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where both sides run the encoder (default cpu)")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no", help="autocast, both sides")
    parser.add_argument("--rss", default="4,32", help="link counts whose peak RSS is compared (default 4,32)")
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_rss", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.slide.is_file():
        sys.exit(f"No slide at {args.slide}; pass --slide.")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args._rss is not None:
            _rss_child(args, work, args._rss)
            return
        encoder = make_encoder(args.encoder, work)
        print(f"{args.slide.name}: {args.tile} px tiles at {args.mpp} um/px, min tissue {MIN_TISSUE}; encoder "
              f"{encoder.identity.split(' weights')[0]} at {encoder.size} px, batch {args.batch_size}, "
              f"{args.device} ({args.precision}), {torch.get_num_threads()} torch threads, "
              f"{len(os.sched_getaffinity(0))} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
        ratio = per_process(encoder, links(args.slide, work / "links", args.copies), work, args)
        counts = [int(n) for n in args.rss.split(",")]
        peaks = [peak_rss(args, work, n) for n in counts]
        for n, (main_mib, worker_mib) in zip(counts, peaks):
            print(f"peak RSS, {n:3d} slides: main process {main_mib:7.1f} MiB, largest worker {worker_mib:7.1f} MiB")
        growth = (peaks[-1][0] - peaks[0][0]) / max(counts[-1] - counts[0], 1)
        print(f"main-process peak growth: {growth:+.2f} MiB per slide")
        print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
