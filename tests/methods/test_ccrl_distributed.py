"""Two real gloo processes against one process on the whole batch."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

WORKERS = Path(__file__).with_name("ccrl_workers.py")


def _workers_module():
    spec = importlib.util.spec_from_file_location("ccrl_workers", WORKERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKERS), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    w = _workers_module()
    method = w.tiny_method()
    ref = w.run(method, method, w.global_batches())

    # Step 0: the mean of the two half-batch losses is the whole-batch loss, and the
    # DDP-averaged gradients are the whole-batch gradients (tolerance: float32 round-off).
    for rank in ranks:
        assert torch.allclose(rank["loss0_mean"], ref["loss0"], rtol=1e-5, atol=1e-6)
        assert rank["grads0"].keys() == ref["grads0"].keys()
        for name, grad in ref["grads0"].items():
            assert torch.allclose(rank["grads0"][name], grad, rtol=1e-4, atol=1e-6), name

    # Both ranks enqueued the gathered keys of both ranks: 8 keys, in global order.
    assert ranks[0]["queue_after0"].shape == (8, 8)
    assert torch.equal(ranks[0]["queue_after0"], ranks[1]["queue_after0"])
    assert torch.allclose(ranks[0]["queue_after0"], ref["queue_after0"], atol=1e-5)

    # After several steps both ranks hold identical weights, momentum encoder and queue,
    # and they match the single-process run.
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
        assert torch.allclose(value.float(), ref["state"][name].float(), rtol=1e-4, atol=1e-5), name
