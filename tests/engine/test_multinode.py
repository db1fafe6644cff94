"""Two machines x two processes on 127.0.0.1, started by launch/slurm.sbatch (with launch/multinode.yaml)
under stand-ins for SLURM's srun and scontrol: the queue receives keys from all 4 ranks and all
ranks end with identical weights."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sslkit.checkpoint import latest_checkpoint

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[2]

# srun runs its command once per node, each with its own SLURM_NODEID; here both "nodes" are this host.
FAKE_SRUN = """#!/bin/bash
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
printf '127.0.0.1\\n127.0.0.1\\n'
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.slow
def test_slurm_script_runs_two_nodes_of_two_processes(tiny_shards, tmp_path):
    assert shutil.which("accelerate", path=str(Path(sys.executable).parent)), "accelerate is installed with sslkit"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "srun", FAKE_SRUN)
    _tool(bin_dir, "scontrol", FAKE_SCONTROL)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "GPUS_PER_NODE": "2",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    args = [*TINY, "data.workers=0", f"data.shards={tiny_shards / 'train'}", f"run.dir={run}",
            "train.max_steps=3", "method.queue_size=256", "data.batch_size=8"]
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "demo", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = latest_checkpoint(run / "checkpoints")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 4 and state["step"] == 3
    # The queue holds the gathered keys of all 4 ranks: 3 steps x 8 per rank x 4 ranks.
    assert int(load_file(str(ckpt / "model.safetensors"))["queue.filled"]) == 3 * 8 * 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # one writer among 4 ranks
    # Every rank hashed its weights and queue at the end; the 4 digests agree.
    assert [(r["replicas"], r["replicas_identical"]) for r in rows if "replicas" in r] == [(4.0, 1.0)]
    # launch/multinode.yaml asks for bf16; train.precision=auto took it from the launcher.
    assert "precision: bf16" in (run / "config.yaml").read_text()


# A host list far longer than a pipe buffer (64 KiB), written a line at a time.
LONG_SCONTROL = """#!/bin/bash
for ((i = 1; i <= 100000; i++)); do printf 'node-%06d\\n' "$i"; done
"""
RECORD_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$SRUN_RECORD"
"""


def test_slurm_script_takes_the_first_host_of_a_list_longer_than_a_pipe(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "srun", RECORD_SRUN)
    _tool(bin_dir, "scontrol", LONG_SCONTROL)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "100000",
           "SLURM_JOB_NODELIST": "node-[000001-100000]", "SRUN_RECORD": str(tmp_path / "srun.txt")}
    # The control: the same list read through `| head -n 1` under pipefail kills the shell with SIGPIPE (141).
    piped = subprocess.run(["bash", "-c", 'set -euo pipefail; x=$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
                            '| head -n 1); echo "$x"'], env=env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 141
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "demo", "train.max_steps=1"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    command = (tmp_path / "srun.txt").read_text()
    assert "--main_process_ip node-000001 " in command and "--num_processes 800000" in command
    assert command.rstrip().endswith("-m sslkit pretrain demo train.max_steps=1")
