"""Data-parallel scaling on CPU: the demo recipe on 2 gloo processes (1 thread each) against 1 process
(2 threads), same machine, same per-process batch, one run of this script.

    python bench/scaling.py [--steps 40] [--batch 256]

Both runs go through the real command (`sslkit pretrain demo`, and `accelerate launch --config_file
launch/cpu-2proc.yaml -m sslkit pretrain demo`) on synthetic shards made first; throughput
(``pairs_per_s``, all ranks' pairs per second of training time) and ``data_wait_share`` (the share of
wall time the main process waited for its loader) are read from each run's metrics.jsonl, leaving out
the first logged interval (warm-up). Both runs use the same 2 cores, so the scaling efficiency is the
2-process throughput over the 1-process one: 1.0 means data parallelism (gradient all-reduce, key
gathering, a loader per rank) costs nothing over intra-op threads. Prints ``ratio=<2 processes / 1
process>`` last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-3000:]}")


def _figures(run: Path) -> tuple[float, float, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "pairs_per_s" in r][1:]  # the first interval holds start-up
    return (statistics.median(r["pairs_per_s"] for r in rows), statistics.median(r["data_wait_share"] for r in rows),
            max(r["mem_peak_gb"] for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "WANDB_MODE": "disabled"}
        _run([str(BIN / "sslkit"), "shard", "synthetic", "--out", str(tmp / "train"), "--num", "8000"], env)
        common = ["demo", f"data.shards={tmp / 'train'}", f"train.max_steps={args.steps}", "train.log_every=5",
                  "train.eval_every=0", f"train.ckpt_every={10 * args.steps}", "tracker.name=none",
                  f"data.batch_size={args.batch}"]
        one, two = tmp / "one", tmp / "two"
        _run([str(BIN / "sslkit"), "pretrain", *common, f"run.dir={one}", "train.threads=2"], env)
        _run([str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launch" / "cpu-2proc.yaml"), "-m",
              "sslkit", "pretrain", *common, f"run.dir={two}", "train.threads=1"], env)
        (p1, w1, m1), (p2, w2, m2) = _figures(one), _figures(two)
    print(f"demo recipe, batch {args.batch} per process, {args.steps} steps, {os.cpu_count()} CPUs")
    print(f"1 process x 2 threads:  {p1:7.0f} pairs/s, data wait {w1:6.1%}, peak RSS {m1:.2f} GB")
    print(f"2 processes x 1 thread: {p2:7.0f} pairs/s, data wait {w2:6.1%}, peak RSS {m2:.2f} GB (rank 0)")
    print(f"scaling efficiency on the same cores: {p2 / p1:.2f}")
    print(f"ratio={p2 / p1:.2f}")


if __name__ == "__main__":
    main()
