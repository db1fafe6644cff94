"""Run by tests/methods/test_ccrl_distributed.py under torchrun with 2 processes (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/methods/ccrl_workers.py OUT
Each rank trains CCRL for a few steps on its half of fixed global batches and saves what
it saw; the test compares with one process on the whole batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from sslkit import dist
from sslkit.config import load_config
from sslkit.methods import build_method

# BatchNorm statistics depend on how a batch is split across ranks; GroupNorm and
# norm-free heads do not, so the two runs can agree to float precision.
OVERRIDES = [
    "model.backbone_kwargs.width=4", "model.backbone_kwargs.norm=group", "model.head_norm=false",
    "model.projector=[16,8]", "model.predictor=[8,8]", "method.queue_size=20", "method.momentum=0.9",
    "method.tau=0.2", "model.channels_last=false",
]
GLOBAL_BATCH, STEPS, SIZE = 8, 3, 16


def tiny_method() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(load_config(None, OVERRIDES))


def global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"query": torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g),
         "key": torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g),
         "label": torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)}
        for _ in range(STEPS)
    ]


def run(model: torch.nn.Module, method: torch.nn.Module, batches, *, lr: float = 0.5) -> dict:
    """SGD on the given batches; returns the first step's loss and gradients and the final state."""
    opt = torch.optim.SGD(method.parameters(), lr=lr)
    record: dict = {}
    for step, batch in enumerate(batches):
        out = model(batch)
        out.loss.backward()
        if step == 0:
            record["loss0"] = out.loss.detach().clone()
            record["grads0"] = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
            record["queue_after0"] = None
        opt.step()
        opt.zero_grad()
        method.after_optimizer_step(step)
        if step == 0:
            record["queue_after0"] = method.queue.current()[0].clone()
    record["state"] = {k: v.clone() for k, v in method.state_dict().items()}
    return record


def main(out: Path) -> None:
    torch_dist.init_process_group("gloo")
    assert dist.world_size() == 2, "this test needs two real processes"
    rank = dist.rank()
    method = tiny_method()
    model = DistributedDataParallel(method, broadcast_buffers=False)
    half = GLOBAL_BATCH // 2
    mine = [{k: v[rank * half:(rank + 1) * half] for k, v in b.items()} for b in global_batches()]
    record = run(model, method, mine)
    loss = record["loss0"].clone()
    torch_dist.all_reduce(loss)
    record["loss0_mean"] = loss / 2
    record["world_size"] = dist.world_size()
    torch.save(record, out / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
