"""dist.replica_digest: what data parallelism must keep identical across ranks, and nothing else."""

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
