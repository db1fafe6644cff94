"""How cost grows with the work: every stage of the pipeline on 10k, 100k and 1M synthetic crops.

    python bench/scale.py [SIZES ...] [--eval-min 100000] [--steps 200] [--work DIR] [--json FILE]

For each size N (default 10000 100000 1000000), in fresh processes, each watched for its peak
resident memory (VmHWM of the process and of every worker it starts, polled):

- **shard**: N demo crops through the sharding runner every ``sslkit shard`` importer uses
  (``run_source``: worker processes, journal, tar writer, manifest) with 1 worker (the training
  set, seed 1) and with 2 workers (a held-out set of other crops, seed 2); crops/s, peak RSS of
  the parent and of the largest worker; then ``sslkit shard verify`` of the training set;
- **loader**: one pass of the training loader (2 workers decode and resize, batches of 256) over
  the N training crops: crops/s and peak RSS of main process plus workers;
- **train**: ``sslkit pretrain demo`` for ``--steps`` steps on the N training crops: median
  ``pairs_per_s`` (first logged interval left out) and peak RSS;
- **evaluate** (sizes >= ``--eval-min``): ``sslkit evaluate`` of that run on the N held-out crops,
  wall time of each stage as ``eval/metrics.json`` reports it (``timings``) and peak RSS.

Then, between the two largest sizes, the per-sample cost ratio of every stage (seconds per crop
at the larger size over seconds per crop at the smaller; 1.0 = linear, target <= 1.15) and the
memory ratio (peak RSS at the larger size over the smaller, the evaluation's embedding matrix,
N x D float32, subtracted from both; 1.0 = flat, target <= 1.2). The last line is
``ratio=<worst stage's per-sample cost ratio>``.

The crops, runs and logs go to a temporary folder (``--work`` keeps them: about 5 GB per million
crops and set). Every figure comes from one run of this script on one machine; the CPU is shared
by every stage's processes, so run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GB = 1024**3

_SHARD = """
import sys, json
from sslkit.sharding.core.runner import run_source
from sslkit.sharding.synthetic import SyntheticSource
n, seed, workers, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
r = run_source(SyntheticSource(num_samples=n, seed=seed, prefix=f"s{seed}"), out, workers=workers,
               shard_size=2000, progress=False)
print(json.dumps({"samples": r["samples"], "seconds": r["seconds"], "failed": r["failed"]}))
"""

_LOAD = """
import sys, json, time, torch
from sslkit.config import DataConfig
from sslkit.data.loaders import train_loader
from sslkit.data.shardset import resolve_shards
torch.set_num_threads(1)
spec, n = sys.argv[1], int(sys.argv[2])
cfg = DataConfig(shards=spec, workers=2, batch_size=256, size=32, shuffle_buffer=2000)
loader = train_loader(resolve_shards(spec), cfg, views=None, seed=0, steps_per_epoch=max(1, n // 256))
start, crops = time.perf_counter(), 0
for batch in loader:
    crops += batch["image"].shape[0]
print(json.dumps({"crops": crops, "seconds": time.perf_counter() - start}))
"""


class Peak:
    """Polls the VmHWM (peak resident set) of a process and of every process it starts."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.root, self.every, self.hwm, self.together = pid, every, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [psutil.Process(self.root)]
                procs += procs[0].children(recursive=True)
            except psutil.NoSuchProcess:
                return
            now = 0
            for proc in procs:
                try:
                    now += proc.memory_info().rss
                    with open(f"/proc/{proc.pid}/status") as status:
                        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
                except (OSError, StopIteration, psutil.Error):
                    continue
                self.hwm[proc.pid] = max(self.hwm.get(proc.pid, 0), kib * 1024)
            self.together = max(self.together, now)
            self._stop.wait(self.every)

    def stop(self) -> dict[str, float]:
        """{"main_gb": peak of the started process, "worker_gb": of its largest child, "sum_gb": the largest
        sum of the resident sets of all of them at one poll}."""
        self._stop.set()
        self._thread.join()
        main = self.hwm.get(self.root, 0)
        others = [v for pid, v in self.hwm.items() if pid != self.root]
        return {"main_gb": main / GB, "worker_gb": max(others, default=0) / GB,
                "sum_gb": max(self.together, main) / GB}


def run(cmd: list[str], *, log: Path) -> tuple[str, float, dict[str, float]]:
    """Run ``cmd`` watched by :class:`Peak`; returns its stdout, wall seconds and peak memory."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        peak = Peak(proc.pid)
        out, _ = proc.communicate()
    wall, mem = time.perf_counter() - start, peak.stop()
    if proc.returncode != 0:
        tail = log.read_text()[-3000:].replace("\r", "\n")
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")
    return out, wall, mem


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def shard_stage(n: int, work: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for workers, seed, name in ((1, 1, "train"), (2, 2, "held")):
        out, _, mem = run([sys.executable, "-c", _SHARD, str(n), str(seed), str(workers), str(work / name)],
                          log=work / f"shard-{name}.log")
        r = last_json(out)
        if r["failed"] or r["samples"] != n:
            raise SystemExit(f"sharding {name} wrote {r['samples']} of {n} crops ({r['failed']} failed).")
        res[f"shard_w{workers}"] = {"seconds": r["seconds"], "per_s": n / r["seconds"], **mem}
    _, wall, mem = run([str(BIN / "sslkit"), "shard", "verify", str(work / "train")], log=work / "verify.log")
    res["verify"] = {"seconds": wall, "per_s": n / wall, **mem}
    return res


def loader_stage(n: int, work: Path) -> dict[str, Any]:
    out, _, mem = run([sys.executable, "-c", _LOAD, str(work / "train"), str(n)], log=work / "loader.log")
    r = last_json(out)
    return {"loader": {"seconds": r["seconds"], "per_s": r["crops"] / r["seconds"], "crops": r["crops"], **mem}}


def train_stage(n: int, work: Path, steps: int) -> dict[str, Any]:
    run_dir = work / "run"
    cmd = [str(BIN / "sslkit"), "pretrain", "demo", f"data.shards={work / 'train'}", f"run.dir={run_dir}",
           f"train.max_steps={steps}", f"train.log_every={max(1, steps // 10)}", "train.eval_every=0",
           f"train.ckpt_every={steps}", "tracker.name=none", "train.threads=2"]
    _, wall, mem = run(cmd, log=work / "train.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["pairs_per_s"] for r in rows if "pairs_per_s" in r]
    pairs = statistics.median(rates[1:] or rates)  # the first logged interval holds the start-up
    return {"train": {"per_s": pairs, "seconds": wall, **mem}}


def eval_stage(n: int, work: Path) -> dict[str, Any]:
    cmd = [str(BIN / "sslkit"), "evaluate", str(work / "run"), "--shards", str(work / "held")]
    _, wall, mem = run(cmd, log=work / "evaluate.log")
    metrics = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    timings = metrics.get("timings", {})
    dim = _embedding_dim(work / "run" / "eval" / "embeddings.npy")
    res: dict[str, Any] = {"evaluate": {"seconds": wall, "per_s": n / wall, **mem,
                                        "matrix_gb": n * dim * 4 / GB, "knn": metrics.get("knn", {})}}
    for key, value in timings.items():
        if key.endswith("_s") and key != "total_s" and isinstance(value, (int, float)):
            res[f"eval.{key[:-2]}"] = {"seconds": float(value), "per_s": n / max(float(value), 1e-9)}
    return res


def _embedding_dim(path: Path) -> int:
    import numpy as np

    return int(np.load(path, mmap_mode="r").shape[1])


def measure(n: int, root: Path, *, steps: int, evaluate: bool) -> dict[str, Any]:
    """Every stage at size ``n``; each stage's figures are printed as soon as it ends (a run stopped
    part-way keeps what it measured)."""
    work = root / f"n{n}"
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    print(f"\n== {n:,} crops (load average {res['load_before']:.2f} at the start)")
    print(f"{'stage':<22}{'per second':>12}{'seconds':>10}{'main GB':>10}{'worker GB':>11}{'load':>7}", flush=True)
    stages = [lambda: shard_stage(n, work), lambda: loader_stage(n, work), lambda: train_stage(n, work, steps)]
    if evaluate:
        stages.append(lambda: eval_stage(n, work))
    for stage in stages:
        figures = stage()
        res.update(figures)
        for name, r in figures.items():
            print_stage(name, r)
    res["load_after"] = os.getloadavg()[0]
    return res


def print_stage(name: str, r: dict[str, Any]) -> None:
    per_s = f"{r['per_s']:12,.0f}" if "per_s" in r else " " * 12
    mem = f"{r['main_gb']:10.2f}{r['worker_gb']:11.2f}" if "main_gb" in r else " " * 21
    print(f"{name:<22}{per_s}{r['seconds']:10.1f}{mem}{os.getloadavg()[0]:7.2f}", flush=True)
    if name == "evaluate":
        knn = r["knn"]
        print(f"evaluate: embedding matrix {r['matrix_gb']:.2f} GB; kNN search {knn.get('search', 'exact')}"
              + (f", recall@{knn.get('k')} {knn['recall_at_k']:.3f}" if "recall_at_k" in knn else ""), flush=True)


def compare(small: int, big: int, a: dict[str, Any], b: dict[str, Any]) -> float:
    """Per-sample cost and memory ratios of every stage measured at both sizes; returns the worst cost ratio."""
    print(f"\n== {big:,} against {small:,} crops: per-sample cost ratio (target <= 1.15), memory ratio "
          "(target <= 1.2; evaluation: embedding matrix subtracted)")
    worst = 0.0
    for name, rb in b.items():
        ra = a.get(name)
        if not isinstance(rb, dict) or not isinstance(ra, dict) or "per_s" not in rb:
            continue
        cost = ra["per_s"] / rb["per_s"]  # (seconds per crop at big) / (seconds per crop at small)
        worst = max(worst, cost)
        line = f"{name:<22}cost {cost:6.2f}"
        if "main_gb" in rb:
            offset_a, offset_b = ra.get("matrix_gb", 0.0), rb.get("matrix_gb", 0.0)
            ma, mb = ra["sum_gb"] - offset_a, rb["sum_gb"] - offset_b
            line += f"   memory {mb / ma:6.2f} ({ma:.2f} -> {mb:.2f} GB)"
        print(line + ("" if cost <= 1.15 else "   ABOVE TARGET"))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--eval-min", type=int, default=100_000, help="evaluate at sizes from this one up")
    parser.add_argument("--steps", type=int, default=200, help="training steps per size")
    parser.add_argument("--work", type=Path, help="keep shards, runs and logs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    root = args.work or Path(tempfile.mkdtemp(prefix="sslkit-scale-"))
    print(f"sizes {sizes}; {os.cpu_count()} CPUs; work folder {root}", flush=True)
    results: dict[int, dict[str, Any]] = {}
    try:
        for n in sizes:
            results[n] = measure(n, root, steps=args.steps, evaluate=n >= args.eval_min)
            print(f"load average {results[n]['load_after']:.2f} at the end", flush=True)
            if args.json:
                args.json.write_text(json.dumps({str(k): r for k, r in results.items()}, indent=1))
            if args.work is None:
                shutil.rmtree(root / f"n{n}", ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    if len(sizes) < 2:
        raise SystemExit("give at least two sizes to compare.")
    worst = compare(sizes[-2], sizes[-1], results[sizes[-2]], results[sizes[-1]])
    print(f"ratio={worst:.2f}")


if __name__ == "__main__":
    main()
