"""The only module that talks across ranks. Every function also works with one process.

Accelerate (or torchrun) initialises the process group; these helpers only use it.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import Tensor


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, identical on every rank; no gradient."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    torch_dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def gather_with_grad(x: Tensor) -> Tensor:
    """Like ``gather_no_grad`` but gradients flow back to each rank's own slice."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def local_slice(batch_size: int) -> slice:
    """The rows of a gathered (world * B, ...) tensor that came from this rank."""
    start = rank() * batch_size
    return slice(start, start + batch_size)


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (any picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out
