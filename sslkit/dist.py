"""The only module that talks across ranks or reads a rank. Every function also works with one process.

Accelerate (or torchrun) initialises the process group; these helpers only use it. Before one
exists (the command line, ``sslkit shard``, which never starts one) the launcher's environment
says which process this is: ``launch_rank`` and ``env_rank`` / ``env_world_size``.

Importing this module loads neither torch nor anything else heavy: ``sslkit shard`` reads its
rank here without torch, and torch is imported by the first function that needs it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Mapping
from itertools import chain
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# (rank, world size) variables a launcher sets for each process, in the order they are trusted:
# torchrun and Accelerate, Slurm's srun, Open MPI, MPICH / Intel MPI.
LAUNCHER_VARS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
                 ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))


def launch_rank(environ: Optional[Mapping[str, str]] = None,
                variables: tuple[tuple[str, str], ...] = LAUNCHER_VARS) -> Optional[tuple[int, int, str]]:
    """(rank, world size, "RANK/WORLD_SIZE") from the first pair of ``variables`` that are both set in
    ``environ`` (default: this process's environment), or None when no pair is. Needs no process group.

    Raises ValueError naming the variables when a pair is set but does not hold integers."""
    environ = os.environ if environ is None else environ
    for rank_var, size_var in variables:
        if rank_var in environ and size_var in environ:
            try:
                return int(environ[rank_var]), int(environ[size_var]), f"{rank_var}/{size_var}"
            except ValueError:
                raise ValueError(f"{rank_var}={environ[rank_var]!r} / {size_var}={environ[size_var]!r} "
                                 "are not integers") from None
    return None


def env_rank() -> int:
    """This process's rank as torchrun or Accelerate set it (``RANK``), else 0; for code that runs
    before the process group exists (``rank()`` once it does)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of processes torchrun or Accelerate started (``WORLD_SIZE``), else 1; for code that
    runs before the process group exists (``world_size()`` once it does)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _torch_dist():  # noqa: ANN202 -- torch.distributed, imported on first use
    import torch.distributed as torch_dist

    return torch_dist


def _no_grad(fn):  # noqa: ANN001, ANN202 -- torch.no_grad() as a decorator, without importing torch up front
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised (never without torch loaded)."""
    if "torch" not in sys.modules:  # no process group can exist yet; do not load torch to say so
        return False
    torch_dist = _torch_dist()
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return _torch_dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _torch_dist().get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


@_no_grad
def gather_no_grad(x: Tensor) -> Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, identical on every rank; no gradient."""
    if not is_distributed():
        return x.detach()
    import torch

    parts = [torch.empty_like(x) for _ in range(world_size())]
    _torch_dist().all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def gather_with_grad(x: Tensor) -> Tensor:
    """Like ``gather_no_grad`` but gradients flow back to each rank's own slice."""
    if not is_distributed():
        return x
    import torch
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def local_slice(batch_size: int) -> slice:
    """The rows of a gathered (world * B, ...) tensor that came from this rank."""
    start = rank() * batch_size
    return slice(start, start + batch_size)


@_no_grad
def all_reduce_no_grad(x: Tensor, op: str = "sum") -> Tensor:
    """``x`` summed ("sum") or its elementwise "max" / "min" over every rank, identical on every rank; a new
    tensor (``x`` is left as it is), no gradient. With one process, a detached copy of ``x``."""
    if op not in ("sum", "max", "min"):
        raise ValueError(f"op must be 'sum', 'max' or 'min', not {op!r}")
    out = x.detach().clone()
    if is_distributed():
        torch_dist = _torch_dist()
        reduce_op = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
        torch_dist.all_reduce(out, op=reduce_op[op])
    return out


def all_true(flag: Tensor) -> bool:
    """True when ``flag`` (a () bool tensor on this rank's device) is true on every rank."""
    import torch

    flag = flag.detach().to(torch.int32)
    if is_distributed():
        _torch_dist().all_reduce(flag, op=_torch_dist().ReduceOp.MIN)
    return bool(flag.item())


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` (any picklable) on every rank; every rank must call this. A decision made on
    one rank (an alert that stops the run) is then taken by all, and none is left waiting in a collective."""
    if not is_distributed():
        return obj
    box = [obj]
    _torch_dist().broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        _torch_dist().barrier()


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (any picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    _torch_dist().all_gather_object(out, obj)
    return out


@_no_grad
def shuffle_across_ranks(x: Tensor) -> tuple[Tensor, Tensor]:
    """MoCo's shuffle-BN, first half: (B, ...) per rank -> this rank's (B, ...) share of the
    whole batch in a random order, and the (world * B,) permutation (rank 0's draw, shared).

    A key encoder that sees the shuffled share computes its BatchNorm statistics over samples
    from other ranks, so a query and its key never share batch statistics. With one process
    the permutation stays within the batch (BatchNorm statistics do not change)."""
    import torch

    full = gather_no_grad(x)  # (world * B, ...), rank order
    order = torch.randperm(full.shape[0], device=x.device)
    if is_distributed():
        _torch_dist().broadcast(order, src=0)
    return full[order[local_slice(x.shape[0])]], order


@_no_grad
def unshuffle_gathered(y: Tensor, order: Tensor) -> Tensor:
    """Second half: each rank's (B, ...) outputs for its shuffled share -> all ranks' outputs
    (world * B, ...) in the original rank order, identical on every rank (what ``gather_no_grad``
    of unshuffled outputs would give)."""
    import torch

    full = gather_no_grad(y)  # row j holds the output for sample order[j]
    out = torch.empty_like(full)
    out[order] = full
    return out


_PER_RANK_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics


@_no_grad
def replica_digest(module: torch.nn.Module) -> str:
    """SHA-256 of ``module``'s parameters and of the buffers data parallelism keeps identical (the
    queue, say; not BatchNorm statistics, which each rank accumulates over its own batches)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if name.rsplit(".", 1)[-1] in _PER_RANK_BUFFERS:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
