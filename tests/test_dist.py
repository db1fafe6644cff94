"""sslkit.dist: what data parallelism must keep identical across ranks (replica_digest), and where a process
learns its rank before a process group exists (the launcher's environment)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from sslkit import dist
from sslkit.models import KeyQueue


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"net": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "queue": KeyQueue(8, 4)})


def test_identical_replicas_have_one_digest():
    assert dist.replica_digest(_model()) == dist.replica_digest(_model())


def test_a_changed_weight_or_queue_changes_the_digest():
    base = dist.replica_digest(_model())
    nudged = _model()
    with torch.no_grad():
        nudged["net"][0].weight[0, 0, 0, 0] += 1e-7  # one float32 ulp-scale change is enough
    assert dist.replica_digest(nudged) != base
    queued = _model()
    queued["queue"].push(torch.ones(1, 4))
    assert dist.replica_digest(queued) != base


def test_batchnorm_statistics_are_per_rank_and_ignored():
    model = _model()
    base = dist.replica_digest(model)
    model["net"].train()(torch.randn(2, 3, 8, 8))  # updates running_mean / running_var / num_batches_tracked
    assert model["net"][1].num_batches_tracked.item() == 1
    assert dist.replica_digest(model) == base


def test_one_process_gathers_trivially():
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(dist.gather_no_grad(x), x)
    assert dist.gather_objects("a") == ["a"]


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "PMI_RANK", "PMI_SIZE")


def _clear_launcher_env(monkeypatch):
    for var in LAUNCHER_ENV:
        monkeypatch.delenv(var, raising=False)


def test_launch_rank_takes_the_first_launcher_whose_pair_is_set(monkeypatch):
    _clear_launcher_env(monkeypatch)
    assert dist.launch_rank() is None
    monkeypatch.setenv("PMI_RANK", "5")  # half a pair counts for nothing
    assert dist.launch_rank() is None
    monkeypatch.setenv("PMI_SIZE", "8")
    assert dist.launch_rank() == (5, 8, "PMI_RANK/PMI_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    assert dist.launch_rank() == (2, 3, "OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert dist.launch_rank() == (3, 4, "SLURM_PROCID/SLURM_NTASKS")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.launch_rank() == (1, 2, "RANK/WORLD_SIZE")
    assert dist.launch_rank({"PMI_RANK": "0", "PMI_SIZE": "1"}) == (0, 1, "PMI_RANK/PMI_SIZE")  # a given mapping
    assert dist.launch_rank(variables=(("SLURM_PROCID", "SLURM_NTASKS"),)) == (3, 4, "SLURM_PROCID/SLURM_NTASKS")


def test_launch_rank_refuses_values_that_are_not_integers(monkeypatch):
    _clear_launcher_env(monkeypatch)
    monkeypatch.setenv("RANK", "one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"^RANK='one' / WORLD_SIZE='2' are not integers$"):
        dist.launch_rank()


def test_env_rank_and_world_size_read_torchrun_and_accelerate(monkeypatch):
    _clear_launcher_env(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "3")  # one Slurm task may start several processes: not their rank
    assert (dist.env_rank(), dist.env_world_size()) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (dist.env_rank(), dist.env_world_size()) == (3, 4)
    assert (dist.rank(), dist.world_size(), dist.is_distributed()) == (0, 1, False)  # no process group here


def test_importing_dist_loads_no_torch():
    """``sslkit shard`` reads its rank through sslkit.dist and must stay free of torch (700 MB a process)."""
    code = ("import sys; from sslkit import dist; assert dist.launch_rank({}) is None and dist.rank() == 0; "
            "assert dist.is_main_process(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ddp_keywords_are_ones_this_torch_takes_without_a_deprecation():
    """The engine turns off DDP's buffer broadcast before every forward with the keyword the installed
    torch supports: forward_sync_buffers where it exists (broadcast_buffers then warns), else the old one.
    tests/engine/test_launch.py checks that two launched ranks print no deprecation."""
    import inspect

    import torch

    from sslkit.engine import _ddp_kwargs

    kwargs = _ddp_kwargs().to_kwargs()
    accepted = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    assert set(kwargs) <= set(accepted) and list(kwargs.values()) == [False]
    expected = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
    assert list(kwargs) == [expected]
