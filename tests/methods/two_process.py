"""Two real gloo processes against one process on the whole batch, for any method.

A *case* is a test module that defines:

    OVERRIDES: list[str]                    config overrides that build a tiny model
    global_batches() -> list[dict]          fixed global batches, as ``forward`` takes them
    split(batch, rank, world) -> dict       optional; default: every tensor's rows in equal contiguous parts

``compare(case_file, tmp_path)`` starts this file under torchrun with 2 processes; each
rank trains its share of the batches with DDP (SGD, a few steps) and saves what it saw;
then one process trains the whole batches and every rank must agree with it: the mean of
the ranks' first losses, the DDP-averaged first gradients, the first queue push (when the
method has a queue) and the final state (weights, momentum encoder, queue).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/methods/two_process.py CASE OUT
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from sslkit import dist
from sslkit.config import load_config
from sslkit.methods import build_method

STEPS_LR = 0.5

# A width-4 pre-activation ResNet-18 with GroupNorm: BatchNorm statistics depend on how a
# batch is split across ranks, GroupNorm does not, so the two runs agree to float precision.
TINY_BACKBONE = ["model.backbone_kwargs.width=4", "model.backbone_kwargs.norm=group", "model.channels_last=false"]


def load_case(path: str | Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_case", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_method(case: ModuleType) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(load_config(None, case.OVERRIDES))


def split(batch: dict, rank: int, world: int) -> dict:
    out = {}
    for name, value in batch.items():
        n = value.shape[0] // world
        out[name] = value[rank * n:(rank + 1) * n]
    return out


def run(model: torch.nn.Module, method: torch.nn.Module, batches: list[dict], *, lr: float = STEPS_LR) -> dict:
    """SGD on the given batches; the first step's loss, gradients and queue, and the final state."""
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=lr)
    record: dict = {}
    for step, batch in enumerate(batches):
        out = model(batch)
        out.loss.backward()
        if step == 0:
            record["loss0"] = out.loss.detach().clone()
            record["grads0"] = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        method.after_optimizer_step(step)
        if step == 0 and hasattr(method, "queue"):
            record["queue_after0"] = method.queue.current()[0].clone()
    record["state"] = {k: v.clone() for k, v in method.state_dict().items()}
    return record


def main(case_path: str, out: Path) -> None:
    torch_dist.init_process_group("gloo")
    assert dist.world_size() == 2, "this test needs two real processes"
    case = load_case(case_path)
    rank, world = dist.rank(), dist.world_size()
    method = tiny_method(case)
    model = DistributedDataParallel(method, broadcast_buffers=False)
    cut = getattr(case, "split", split)
    record = run(model, method, [cut(b, rank, world) for b in case.global_batches()])
    loss = record["loss0"].clone()
    torch_dist.all_reduce(loss)
    record["loss0_mean"] = loss / world
    record["world_size"] = world
    torch.save(record, out / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def compare(case_path: str | Path, tmp_path: Path, *, rtol: float = 1e-4, atol: float = 1e-5) -> list[dict]:
    """Run the case on 2 processes and on 1, assert they agree; returns the ranks' records."""
    from processes import run_two_ranks  # tests/ (the ranks run this file as a script, without it)

    ranks = run_two_ranks(__file__, str(case_path), out=tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]

    case = load_case(case_path)
    method = tiny_method(case)
    ref = run(method, method, case.global_batches())
    for rank in ranks:
        # The mean of the two half-batch losses is the whole-batch loss, and the DDP-averaged
        # gradients are the whole-batch gradients (tolerance: float32 round-off).
        assert torch.allclose(rank["loss0_mean"], ref["loss0"], rtol=1e-5, atol=1e-6), \
            (rank["loss0_mean"], ref["loss0"])
        assert rank["grads0"].keys() == ref["grads0"].keys()
        assert ref["grads0"], "no parameter received a gradient"
        for name, grad in ref["grads0"].items():
            assert torch.allclose(rank["grads0"][name], grad, rtol=rtol, atol=1e-6), name
        if "queue_after0" in ref:  # both ranks enqueued the gathered keys of both, in global order
            assert torch.allclose(rank["queue_after0"], ref["queue_after0"], atol=atol)
    # After several steps both ranks hold identical weights (and momentum encoder, queue),
    # and they match the single-process run.
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
        assert torch.allclose(value.float(), ref["state"][name].float(), rtol=rtol, atol=atol), name
    return ranks


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
