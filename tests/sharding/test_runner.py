"""The sharding runner: workers, ranks, kill -9 and resume, crashes, refusals."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from sslkit.errors import UsageError
from sslkit.shardformat import read_manifest
from sslkit.sharding.core.journal import JOURNAL_DIR
from sslkit.sharding.core.runner import job_rank, partition, run_source
from sslkit.sharding.core.source import Unit
from sslkit.sharding.core.verify import verify_shards
from sslkit.sharding.synthetic import SyntheticSource

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import the test sources by name
from runner_sources import FailingSource  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def contents(folder: Path) -> dict[str, str]:
    """key.ext -> sha256 of the member, over every shard the manifest lists (layout-independent)."""
    out: dict[str, str] = {}
    for shard in read_manifest(folder)["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for member in tar:
                assert member.name not in out, f"{member.name} written twice"
                out[member.name] = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    return out


def test_workers_and_in_process_write_the_same_samples(tmp_path: Path) -> None:
    source = SyntheticSource(num_samples=300, chunk=64, seed=3)
    inline = run_source(source, tmp_path / "a", workers=0, shard_size=100, progress=False)
    pooled = run_source(source, tmp_path / "b", workers=2, shard_size=100, progress=False)
    assert inline["samples"] == pooled["samples"] == 300 and inline["units_done"] == 5
    assert contents(tmp_path / "a") == contents(tmp_path / "b")
    assert len(contents(tmp_path / "a")) == 300 * 3  # png, cls, json
    manifest = pooled["manifest"]
    assert manifest["classes"] == {"epithelial": 75, "inflammatory": 75, "spindle": 75, "misc": 75}
    assert [s["status"] for s in manifest["sources"]] == ["done"] * 5 and manifest["failed"] == []
    assert verify_shards(tmp_path / "b")["ok"]


def test_rerun_of_a_finished_job_does_nothing_and_keeps_the_manifest(tmp_path: Path) -> None:
    source = SyntheticSource(num_samples=100, chunk=40)
    first = run_source(source, tmp_path, workers=0, shard_size=30, progress=False)
    again = run_source(source, tmp_path, workers=0, shard_size=30, progress=False)
    assert again["units_before"] == 3 and again["samples"] == 0
    assert again["manifest"]["shards"] == first["manifest"]["shards"]


_JOB = """
import sys
from sslkit.sharding.core.runner import run_source
from sslkit.sharding.synthetic import SyntheticSource
run_source(SyntheticSource(num_samples=int(sys.argv[2]), chunk=50, seed=7), sys.argv[1],
           workers=int(sys.argv[3]), shard_size=40, progress=False)
"""


def _job(out: Path, num: int, workers: int, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _JOB, str(out), str(num), str(workers)], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _journaled_shards(out: Path) -> int:
    return sum(line.count('"type": "shard"') for p in (out / JOURNAL_DIR).glob("journal-*.jsonl")
               for line in p.read_text().splitlines())


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_samples(tmp_path: Path) -> None:
    straight = _job(tmp_path / "straight", 3000, 2)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    killed = _job(tmp_path / "killed", 3000, 2)
    deadline = time.monotonic() + 240
    while _journaled_shards(tmp_path / "killed") < 8:
        assert killed.poll() is None, "the job ended before it could be killed; make it larger"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    time.sleep(1.0)  # its workers end with it (they watch the job's process): nothing may change after this
    snapshot = {p.name: p.stat().st_size for p in (tmp_path / "killed").iterdir()}
    time.sleep(1.0)
    assert {p.name: p.stat().st_size for p in (tmp_path / "killed").iterdir()} == snapshot
    assert not (tmp_path / "killed" / "manifest.json").exists()
    resumed = _job(tmp_path / "killed", 3000, 2)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert "already done" in resumed.stdout.read()
    assert contents(tmp_path / "killed") == contents(tmp_path / "straight")
    assert len(contents(tmp_path / "killed")) == 3000 * 3
    assert verify_shards(tmp_path / "killed")["ok"]


@pytest.mark.slow
def test_two_ranks_from_the_environment_split_the_job(tmp_path: Path) -> None:
    jobs = [_job(tmp_path, 1000, 1, env={"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    outputs = []
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.stderr.read()
        outputs.append(job.stdout.read())
    assert all("of 2 (from RANK/WORLD_SIZE)" in out for out in outputs)
    manifest = read_manifest(tmp_path)
    ranks = {s["name"].split("-")[1] for s in manifest["shards"]}
    assert ranks == {"r000", "r001"}
    by_rank: dict[str, set[str]] = {"r000": set(), "r001": set()}
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / shard["name"]) as tar:
            by_rank[shard["name"].split("-")[1]] |= {m.name.split(".")[0] for m in tar}
    assert not by_rank["r000"] & by_rank["r001"]
    assert by_rank["r000"] | by_rank["r001"] == {f"demo-{i:07d}" for i in range(1000)}
    assert manifest["num_samples"] == 1000


def test_a_failing_unit_is_recorded_and_not_duplicated_on_rerun(tmp_path: Path) -> None:
    source = FailingSource(bad=1, after=5, num_samples=200, chunk=50)
    first = run_source(source, tmp_path, workers=0, shard_size=1000, progress=False)
    assert first["units_done"] == 3 and first["units_failed"] == 1
    manifest = first["manifest"]
    assert manifest["num_samples"] == 155  # the 5 crops before the damage are kept
    assert manifest["failed"] == [{"source": "synthetic[50:100]",
                                   "reason": "synthetic[50:100] is damaged after 5 crops"}]
    assert [s["samples"] for s in manifest["sources"]] == [50, 5, 50, 50]
    again = run_source(source, tmp_path, workers=0, shard_size=1000, progress=False)  # retried from crop 5
    assert again["units_before"] == 3 and again["units_failed"] == 1 and again["samples"] == 0
    assert again["manifest"]["num_samples"] == 155 and len(contents(tmp_path)) == 155 * 3


def test_a_crashing_worker_fails_its_unit_and_the_rest_is_redone(tmp_path: Path) -> None:
    source = FailingSource(bad=2, after=10, crash=True, num_samples=400, chunk=50)
    summary = run_source(source, tmp_path, workers=2, shard_size=10_000, progress=False)
    [failure] = summary["failed"]
    assert failure["source"] == "synthetic[100:150]" and "SIGSEGV" in failure["reason"]
    manifest = summary["manifest"]
    assert manifest["num_samples"] == 350  # the crashed unit's crops sat in its unfinished shard
    keys = {name.split(".")[0] for name in contents(tmp_path)}
    assert keys == {f"demo-{i:07d}" for i in range(400) if not 100 <= i < 150}
    assert not list(tmp_path.glob("*.tmp")) and verify_shards(tmp_path)["ok"]


def test_other_settings_in_the_same_folder_are_refused(tmp_path: Path) -> None:
    run_source(SyntheticSource(num_samples=20, chunk=10, size=32), tmp_path, workers=0, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(params.size: 32 before, 24 now\)"):
        run_source(SyntheticSource(num_samples=20, chunk=10, size=24), tmp_path, workers=0, progress=False)


def test_a_second_process_on_the_same_rank_is_refused(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_DIR).mkdir()
    with open(tmp_path / JOURNAL_DIR / "rank-000.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="Another `sslkit shard` process is writing rank 0"):
            run_source(SyntheticSource(num_samples=10, chunk=10), tmp_path, workers=0, progress=False)


def test_a_deleted_shard_is_named(tmp_path: Path) -> None:
    source = SyntheticSource(num_samples=60, chunk=20)
    manifest = run_source(source, tmp_path, workers=0, shard_size=20, progress=False)["manifest"]
    (tmp_path / manifest["shards"][1]["name"]).unlink()
    with pytest.raises(ValueError, match=manifest["shards"][1]["name"]):
        run_source(source, tmp_path, workers=0, shard_size=20, progress=False)


def test_partition_balances_cost_and_is_deterministic() -> None:
    units = [Unit(id=f"u{i}", path=f"u{i}", cost=c) for i, c in enumerate([10, 1, 1, 1, 7, 3, 3, 2])]
    shares = partition(units, 2)
    assert shares == partition(list(units), 2)
    assert sorted(i for share in shares for i in share) == list(range(8))
    loads = [sum(units[i].cost for i in share) for share in shares]
    assert loads == [14, 14]  # LPT: 10+3+1 / 7+3+2+1+1 ... both 14 here
    assert partition(units, 1) == [list(range(8))]
    assert partition(units[:1], 3) == [[0], [], []]


def test_job_rank_reads_the_launchers(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert job_rank() == (0, 1, "default")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert job_rank() == (3, 4, "SLURM_PROCID/SLURM_NTASKS")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert job_rank() == (1, 2, "RANK/WORLD_SIZE")
    assert job_rank(0, 5) == (0, 5, "arguments")
    with pytest.raises(UsageError, match="impossible"):
        job_rank(5, 5)
    with pytest.raises(UsageError, match="both --rank and --world-size"):
        job_rank(1, None)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UsageError, match=r"^RANK='one' / WORLD_SIZE='2' are not integers; .* pass --rank"):
        job_rank()
