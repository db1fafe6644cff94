"""The only module that talks across ranks. Every function also works with one process.

Accelerate (or torchrun) initialises the process group; these helpers only use it.
"""

from __future__ import annotations

import hashlib
from itertools import chain

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


def all_true(flag: Tensor) -> bool:
    """True when ``flag`` (a () bool tensor on this rank's device) is true on every rank."""
    flag = flag.detach().to(torch.int32)
    if is_distributed():
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
    return bool(flag.item())


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


@torch.no_grad()
def shuffle_across_ranks(x: Tensor) -> tuple[Tensor, Tensor]:
    """MoCo's shuffle-BN, first half: (B, ...) per rank -> this rank's (B, ...) share of the
    whole batch in a random order, and the (world * B,) permutation (rank 0's draw, shared).

    A key encoder that sees the shuffled share computes its BatchNorm statistics over samples
    from other ranks, so a query and its key never share batch statistics. With one process
    the permutation stays within the batch (BatchNorm statistics do not change)."""
    full = gather_no_grad(x)  # (world * B, ...), rank order
    order = torch.randperm(full.shape[0], device=x.device)
    if is_distributed():
        torch_dist.broadcast(order, src=0)
    return full[order[local_slice(x.shape[0])]], order


@torch.no_grad()
def unshuffle_gathered(y: Tensor, order: Tensor) -> Tensor:
    """Second half: each rank's (B, ...) outputs for its shuffled share -> all ranks' outputs
    (world * B, ...) in the original rank order, identical on every rank (what ``gather_no_grad``
    of unshuffled outputs would give)."""
    full = gather_no_grad(y)  # row j holds the output for sample order[j]
    out = torch.empty_like(full)
    out[order] = full
    return out


_PER_RANK_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics


@torch.no_grad()
def replica_digest(module: torch.nn.Module) -> str:
    """SHA-256 of ``module``'s parameters and of the buffers data parallelism keeps identical (the
    queue, say; not BatchNorm statistics, which each rank accumulates over its own batches)."""
    digest = hashlib.sha256()
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if name.rsplit(".", 1)[-1] in _PER_RANK_BUFFERS:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
