"""`accelerate launch` with launch/cpu-2proc.yaml really runs two ranks through the engine."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sslkit.checkpoint import latest_checkpoint

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_shards, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "the accelerate command is installed with sslkit"
    run = tmp_path / "run"
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch" / "cpu-2proc.yaml"), "-m", "sslkit",
           "pretrain", "demo", *TINY, f"data.shards={tiny_shards / 'train'}", f"run.dir={run}",
           "train.max_steps=3", "method.queue_size=256", f"eval.shards={tiny_shards / 'eval'}",
           "train.eval_every=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Run directory:") == 1  # only the main process prints
    # No warning a user must learn to ignore: none of the ranks may print a deprecation (the DDP
    # keyword broadcast_buffers did, once per rank, under torch 2.14).
    warned = [line for line in proc.stderr.splitlines() if "DeprecationWarning" in line or "FutureWarning" in line]
    assert not warned, warned
    ckpt = latest_checkpoint(run / "checkpoints")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    # Keys gathered from both ranks were enqueued: 3 steps x 16 per rank x 2 ranks.
    weights = load_file(str(ckpt / "model.safetensors"))
    assert int(weights["queue.filled"]) == 3 * 16 * 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # one writer, not two
    # Online evaluation at step 2 and at the end: both ranks embedded their share of all 96 crops.
    online = [r for r in rows if "online/knn_top1" in r]
    assert [r["step"] for r in online] == [2, 3]
    assert all(r["online/samples"] == 96 and 0.0 <= r["online/knn_top1"] <= 1.0 for r in online)
