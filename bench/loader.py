"""Loader throughput: sslkit shards -> uint8 batches -> BatchViews, against torchvision ImageFolder
with the same two-view recipe per image in the workers. Same crops, 2 workers, batch 256.

    python bench/loader.py [--crops 8000] [--batches 20] [--repeats 3] [--threads 2,1] [--no-rss]

sslkit side, what ``sslkit pretrain`` does with the default tensor back-end: ``train_loader``
(workers read shards, decode and resize to uint8), then ``BatchViews`` on each batch in the
main process (the method's ``prepare``) -> query and key. Peer: ``ImageFolder`` over the same
crops written as PNG files in class folders, ``transform=build_views(...)`` (sslkit's torchvision
v2 recipe on one PIL image at a time), ``DataLoader(shuffle=True, persistent_workers=True)``,
default collate. Every timed block builds its loader afresh, starts the workers and takes
``--warmup`` batches before the clock starts; sslkit and peer blocks alternate; medians are
printed. Then the memory check: the same sslkit loader over 8 shards and over 80 shards (500
crops each) in fresh processes, the same number of batches, RSS of the main process plus its
workers after the read. The last line is ``ratio=<sslkit/peer>`` at the default thread count.
"""

from __future__ import annotations

import os

# As the sslkit command does before torch loads OpenMP (sslkit/cli.py): idle OpenMP threads
# must not spin on the cores the workers need. Both sides run in this process, so both get it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from sslkit.config import DataConfig, ViewsConfig  # noqa: E402
from sslkit.data.augment import BatchViews, build_views  # noqa: E402
from sslkit.data.loaders import train_loader  # noqa: E402
from sslkit.data.shardset import resolve_shards  # noqa: E402
from sslkit.sharding.synthetic import make_synthetic  # noqa: E402

SHARD = 500  # crops per shard
WORKERS, BATCH, SIZE = 2, 256, 32


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def _spec(folder: Path, shards: int) -> str:
    """The first ``shards`` shards of ``folder`` as a brace pattern (the manifest beside them gives the counts)."""
    return str(folder / f"demo-{{000000..{shards - 1:06d}}}.tar")


def export_folder(spec: str, root: Path) -> int:
    """Write every crop of the shards in ``spec`` as ``root/<label>/<key>.png`` (the stored PNG bytes)."""
    n = 0
    for url in resolve_shards(spec).urls:
        with tarfile.open(url) as tar:
            members = {m.name: m for m in tar}
            for name, member in members.items():
                if not name.endswith(".png"):
                    continue
                key = name[:-4]
                label = tar.extractfile(members[key + ".cls"]).read().decode().strip()
                (root / label).mkdir(parents=True, exist_ok=True)
                (root / label / name).write_bytes(tar.extractfile(member).read())
                n += 1
    return n


def sslkit_batches(spec: str) -> tuple[DataLoader, BatchViews]:
    cfg = DataConfig(shards=spec, workers=WORKERS, batch_size=BATCH, size=SIZE)
    loader = train_loader(resolve_shards(spec), cfg, views=None, seed=0, steps_per_epoch=10**6)
    return loader, BatchViews(cfg.views, channels=3)


def time_sslkit(spec: str, *, batches: int, warmup: int, threads: int) -> float:
    """Crops (= view pairs) per second: workers decode, the main process makes both views."""
    torch.set_num_threads(threads)
    loader, views = sslkit_batches(spec)
    generator = torch.Generator()
    it = iter(loader)

    def step(i: int) -> int:
        batch = next(it)
        generator.manual_seed(i)  # as the engine's _Inputs: one seed per micro-batch
        query, key = views(batch.pop("image"), generator=generator)
        return query.shape[0]

    for i in range(warmup):
        step(i)
    start, crops = time.perf_counter(), 0
    for i in range(batches):
        crops += step(warmup + i)
    return crops / (time.perf_counter() - start)  # the loader goes with this frame: its workers stop


def time_peer(root: Path, *, batches: int, warmup: int, threads: int) -> float:
    """Crops per second: ImageFolder + the same two views per PIL image in the workers, default collate."""
    torch.set_num_threads(threads)
    dataset = ImageFolder(str(root), transform=build_views(ViewsConfig(), size=SIZE, channels=3))
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS, shuffle=True, persistent_workers=True)
    if len(loader) < warmup + batches:
        raise SystemExit(f"--crops gives {len(loader)} peer batches per epoch; need {warmup + batches}.")
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, crops = time.perf_counter(), 0
    for _ in range(batches):
        (query, key), labels = next(it)
        crops += query.shape[0]
    return crops / (time.perf_counter() - start)


# ---------------------------------------------------------------- memory


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def rss_child(spec: str, batches: int) -> None:
    """Read ``batches`` batches (views included) and print the RSS of this process and its workers."""
    torch.set_num_threads(2)
    loader, views = sslkit_batches(spec)
    it = iter(loader)
    for i in range(batches):
        batch = next(it)
        views(batch.pop("image"), generator=torch.Generator().manual_seed(i))
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    info = [p.memory_full_info() for p in procs]
    print(json.dumps({"shards": len(resolve_shards(spec).urls), "processes": len(procs),
                      "rss": sum(m.rss for m in info), "pss": sum(m.pss for m in info),
                      "peak": sum(_hwm_kib(p.pid) * 1024 for p in procs)}))


def measure_rss(spec: str, batches: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", spec, "--batches", str(batches)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=8000, help="crops in the throughput set (shards of 500)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per block")
    parser.add_argument("--warmup", type=int, default=4, help="batches taken after the workers start, untimed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="2,1",
                        help="main-process torch threads to try for sslkit; the first is the default and the ratio's")
    parser.add_argument("--rss-batches", type=int, default=40)
    parser.add_argument("--no-rss", action="store_true", help="skip the memory check (8 vs 80 shards)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.batches)
        return
    threads = [int(t) for t in args.threads.split(",")]
    small, large = 8, 80
    shards = max(-(-args.crops // SHARD), small if args.no_rss else large)
    print(f"load average {_load()} at start; {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        make_synthetic(tmp_path / "shards", num_samples=shards * SHARD, size=SIZE, seed=0, shard_size=SHARD,
                       progress=False)
        spec = _spec(tmp_path / "shards", -(-args.crops // SHARD))
        n = export_folder(spec, tmp_path / "folder")
        print(f"data: {shards} shards of {SHARD} synthetic {SIZE}x{SIZE} crops; the throughput set is the first "
              f"{n} crops, also written as PNG files for ImageFolder ({time.perf_counter() - start:.1f} s, not timed)")
        print(f"each block: fresh loader, {WORKERS} workers, batch {BATCH}, {args.warmup} batches warm-up, "
              f"{args.batches} timed; views: ViewsConfig() defaults (local-global)")

        rates: dict[str, list[float]] = {f"sslkit, {t} main threads": [] for t in threads}
        rates["peer (ImageFolder)"] = []
        for _ in range(args.repeats):
            for t in threads:
                rates[f"sslkit, {t} main threads"].append(
                    time_sslkit(spec, batches=args.batches, warmup=args.warmup, threads=t))
            rates["peer (ImageFolder)"].append(
                time_peer(tmp_path / "folder", batches=args.batches, warmup=args.warmup, threads=threads[0]))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        for name, r in rates.items():
            runs = ", ".join(f"{x:.0f}" for x in r)
            print(f"{name:28s} {medians[name]:7.0f} crops/s  (median of {len(r)}: {runs})")

        if not args.no_rss:
            sizes = {}
            for count in (small, large, small, large):  # twice each, alternating
                sizes.setdefault(count, []).append(measure_rss(_spec(tmp_path / "shards", count), args.rss_batches))
            for count, runs in sizes.items():
                rss, pss, peak = (" / ".join(f"{r[k] / 2**20:.0f}" for r in runs) for k in ("rss", "pss", "peak"))
                print(f"memory, {count:2d} shards x {SHARD}, {args.rss_batches} batches, main + "
                      f"{runs[0]['processes'] - 1} workers: RSS {rss} MiB, PSS {pss} MiB, peak RSS (VmHWM) {peak} MiB")
            rss = {count: statistics.median(r["rss"] for r in runs) for count, runs in sizes.items()}
            peak = {count: statistics.median(r["peak"] for r in runs) for count, runs in sizes.items()}
            print(f"RSS {large} / {small} shards: {rss[large] / rss[small]:.3f}; peak {peak[large] / peak[small]:.3f}")

    ratio = medians[f"sslkit, {threads[0]} main threads"] / medians["peer (ImageFolder)"]
    print(f"load average {_load()} at end")
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
