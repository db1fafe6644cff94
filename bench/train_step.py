"""Training throughput: sslkit's CCRL in MoCo v2 mode against lightly's MoCo building blocks.

    python bench/train_step.py [--backbone preact_resnet18] [--width 16] [--batch 256] [--queue 1024]
                               [--steps 2] [--blocks 8] [--threads 2] [--device cpu|cuda] [--no-memory]

Both sides get the same backbone (``sslkit.models.create_backbone``, same weights), the same
projection head (Linear-ReLU-Linear: sslkit ``MLPHead(norm=False)``, lightly
``MoCoProjectionHead(batch_norm=False)``, MoCo v2's head), the same optimiser (Adam with
sslkit's parameter groups: weight decay on weights, none on biases and norms), queue size,
temperature and momentum, and identical pre-made view tensors (augmentation is not timed).

- sslkit: ``build_method`` on the ``demo`` recipe with ``method.in_batch_negatives=false
  method.use_predictor=false model.head_norm=false`` (MoCo v2); one step is what
  ``sslkit/engine.py`` does per optimiser step: ``method(batch)``, ``loss.backward()``,
  ``optimizer.step()``, ``zero_grad(set_to_none=True)``, ``method.after_optimizer_step(step)``.
  ``sslkit CCRL`` is the same with in-batch negatives, the predictor and BatchNorm in the
  heads' hidden layers (the demo's CCRL with its predictor on), printed as an extra line.
- lightly 1.6: lightly's MoCo example (examples/pytorch/moco.py) with this backbone:
  ``update_momentum`` on backbone and head, query forward, key forward on the
  ``deactivate_requires_grad`` copies, ``NTXentLoss(memory_bank_size=(Q, D))``, backward,
  step, ``zero_grad()``.

Before timing, sslkit's queue is filled with lightly's (random) memory bank, so the two MoCo
runs compute the same losses step for step; the largest difference is printed as a check.
Blocks of ``--steps`` steps alternate (sslkit MoCo, lightly, sslkit CCRL, the order rotated
every round) after warm-up steps; medians of pairs per second, by the wall clock and per
CPU-second of this process (which other jobs on a shared machine disturb less). On CUDA
sslkit runs under bf16 autocast with channels_last (``train.precision=bf16
model.channels_last=true``); lightly in float32 as its example does, or like sslkit with
``--peer-amp``. Peak memory: each side again in a fresh process, twice: peak RSS over the
steps (VmHWM from /proc), the peak of tensor storage one step allocates (``TensorPeak``), and
on CUDA ``max_memory_allocated``. The last line is ``ratio=<sslkit MoCo / lightly>``, wall clock.
"""

from __future__ import annotations

import os

# As the sslkit command does before torch loads OpenMP (sslkit/cli.py); both sides share it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import torch  # noqa: E402
from lightly.loss import NTXentLoss  # noqa: E402
from lightly.models.modules import MoCoProjectionHead  # noqa: E402
from lightly.models.utils import deactivate_requires_grad, update_momentum  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from sslkit.config import (  # noqa: E402
    Config,
    apply_overrides,
    load_config,
    recipe_path,  # noqa: E402
)
from sslkit.data.augment import BatchViews  # noqa: E402
from sslkit.methods import build_method  # noqa: E402
from sslkit.models import create_backbone  # noqa: E402
from sslkit.optim import build_optimizer  # noqa: E402
from sslkit.sharding.synthetic import render_batch  # noqa: E402

SIDES = ("sslkit MoCo", "lightly MoCo", "sslkit CCRL")
POOL = 4  # distinct input batches, cycled


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def sslkit_config(args: argparse.Namespace, *, ccrl: bool) -> Config:
    mode = ["method.in_batch_negatives=true", "method.use_predictor=true", "model.head_norm=true"] if ccrl else \
        ["method.in_batch_negatives=false", "method.use_predictor=false", "model.head_norm=false"]
    cfg = load_config(recipe_path("demo"), [*mode, f"data.batch_size={args.batch}", f"method.queue_size={args.queue}",
                                            f"model.backbone={args.backbone}"])
    cfg.model.backbone_kwargs = {"width": args.width} if args.backbone.startswith("preact_") else {}
    return apply_overrides(cfg, [])  # validated


def make_inputs(args: argparse.Namespace, device: torch.device) -> list[dict[str, Tensor]]:
    """POOL batches of (query, key) views of synthetic crops, as the engine hands them to the method."""
    images, labels = render_batch(range(POOL * args.batch), size=args.size, seed=0)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    views = BatchViews(load_config(recipe_path("demo")).data.views, channels=3)
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(POOL):
        part = slice(i * args.batch, (i + 1) * args.batch)
        query, key = views(images[part], generator=generator)
        out.append({"query": query.to(device), "key": key.to(device),
                    "label": torch.from_numpy(labels[part]).to(device)})
    return out


def _channels_last(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}


class LightlyMoCo(nn.Module):
    """lightly's examples/pytorch/moco.py model, with the given backbone and head sizes."""

    def __init__(self, backbone: nn.Module, hidden: int, out: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(backbone.num_features, hidden, out)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def build_sides(args: argparse.Namespace, device: torch.device, sides: tuple[str, ...]) -> dict[str, Callable]:
    """One training step per side: ``step(i) -> loss`` (a detached scalar tensor)."""
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    peer_amp = amp if args.peer_amp else nullcontext
    inputs = make_inputs(args, device)
    steps: dict[str, Callable] = {}

    torch.manual_seed(0)
    moco_cfg = sslkit_config(args, ccrl=False)
    hidden, out = moco_cfg.model.projector
    criterion = NTXentLoss(temperature=moco_cfg.method.tau, memory_bank_size=(args.queue, out)).to(device)
    moco = build_method(moco_cfg).to(device) if "sslkit MoCo" in sides else None
    if moco is not None:
        with torch.no_grad():  # sslkit's queue starts as lightly's bank: full of the same random keys
            moco.queue.keys.copy_(criterion.memory_bank.bank)
            moco.queue.filled.fill_(args.queue)
    peer = None
    if "lightly MoCo" in sides:
        peer = LightlyMoCo(create_backbone(moco_cfg.model.backbone, in_chans=3, **moco_cfg.model.backbone_kwargs),
                           hidden, out)
        if moco is not None:  # sslkit's initial weights (its key encoder is their copy too)
            with torch.no_grad():
                peer.backbone.load_state_dict(moco.encoder.backbone.state_dict())
                for mine, theirs in zip(moco.encoder.projector.parameters(), peer.projection_head.parameters(),
                                        strict=True):
                    theirs.copy_(mine)
            peer.backbone_momentum.load_state_dict(peer.backbone.state_dict())
            peer.projection_head_momentum.load_state_dict(peer.projection_head.state_dict())
        peer = peer.to(device, memory_format=torch.channels_last) if cuda and args.peer_amp else peer.to(device)

    def sslkit_step(method: nn.Module, cfg: Config) -> Callable:
        if cuda:  # as the engine: channels_last before the optimizer is built
            method.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg.optim, model=method)
        method.train()
        batches = [_channels_last(b) for b in inputs] if cuda else inputs

        def step(i: int) -> Tensor:
            with amp():
                result = method(dict(batches[i % POOL]))
            result.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(i)
            return result.loss.detach()

        return step

    def lightly_step() -> Callable:
        decay = [p for p in peer.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in peer.parameters() if p.requires_grad and p.ndim <= 1]
        optimizer = torch.optim.Adam([{"params": decay, "weight_decay": moco_cfg.optim.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=moco_cfg.optim.lr, betas=tuple(moco_cfg.optim.betas))
        peer.train()
        batches = [_channels_last(b) for b in inputs] if cuda and args.peer_amp else inputs
        m = moco_cfg.method.momentum

        def step(i: int) -> Tensor:
            batch = batches[i % POOL]
            update_momentum(peer.backbone, peer.backbone_momentum, m=m)
            update_momentum(peer.projection_head, peer.projection_head_momentum, m=m)
            with peer_amp():
                query = peer(batch["query"])
                key = peer.forward_momentum(batch["key"])
                loss = criterion(query, key)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.detach()

        return step

    if moco is not None:
        steps["sslkit MoCo"] = sslkit_step(moco, moco_cfg)
    if peer is not None:
        steps["lightly MoCo"] = lightly_step()
    if "sslkit CCRL" in sides:
        torch.manual_seed(0)
        ccrl_cfg = sslkit_config(args, ccrl=True)
        steps["sslkit CCRL"] = sslkit_step(build_method(ccrl_cfg).to(device), ccrl_cfg)
    return steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


class TensorPeak(TorchDispatchMode):
    """Bytes of tensor storage alive at once while active: each new storage an op returns is
    counted until it is freed (a weakref finalizer). Independent of the allocator's caching and
    fragmentation, unlike a process's peak RSS."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self.storages.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 -- torch's signature
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and ptr not in self.storages:  # a new storage, not a view of a counted one
                self.storages.add(ptr)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, ptr, nbytes)
        return out


def memory_child(args: argparse.Namespace, device: torch.device) -> None:
    """Peak memory of one side in this fresh process: its model and inputs built, then warm-up +
    one block of steps. The peak RSS is reset first (``5`` to /proc/self/clear_refs), so it covers
    the steps only; ``before`` is the resident size at that point (libraries, model, inputs).
    ``tensors``: the largest amount of tensor storage one more step allocates at once (``TensorPeak``)."""
    side = args.memory_child
    step = build_sides(args, device, (side,))[side]
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status_mib("VmRSS")
    for i in range(args.warmup + args.steps):
        step(i)
    _sync(device)
    after = _status_mib("VmHWM")
    cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    with TensorPeak() as tracked:
        step(args.warmup + args.steps)
    print(json.dumps({"before": before, "after": after, "cuda": cuda, "tensors": tracked.peak / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="preact_resnet18", help="any timm name, e.g. resnet18")
    parser.add_argument("--width", type=int, default=16, help="preact_resnet* width (the demo's 16)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--queue", type=int, default=1024, help="queue / memory bank size (the demo's 1,024)")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peer-amp", action="store_true", help="on CUDA, lightly under bf16 + channels_last too")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        memory_child(args, device)
        return

    print(f"load average {_load()} at start; {os.cpu_count()} CPUs, {args.threads} torch threads, "
          f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    width = f" width {args.width}" if args.backbone.startswith("preact_") else ""
    print(f"{args.backbone}{width}, {args.size}x{args.size}, batch {args.batch}, queue {args.queue}, "
          f"{args.warmup} warm-up steps, then {args.blocks} blocks of {args.steps} steps per side, alternating")
    steps = build_sides(args, device, SIDES)
    losses: dict[str, list[Tensor]] = {side: [] for side in SIDES}
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    per_cpu: dict[str, list[float]] = {side: [] for side in SIDES}  # pairs per CPU-second of this process
    for side, step in steps.items():
        for i in range(args.warmup):
            losses[side].append(step(i))
    order = list(steps.items())
    for block in range(args.blocks):
        for side, step in order[block % len(order):] + order[:block % len(order)]:  # rotated: no side always first
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                losses[side].append(step(args.warmup + block * args.steps + i))
            _sync(device)
            rates[side].append(args.batch * args.steps / (time.perf_counter() - start))
            per_cpu[side].append(args.batch * args.steps / (time.process_time() - cpu))

    mine, theirs = torch.stack(losses["sslkit MoCo"]).float(), torch.stack(losses["lightly MoCo"]).float()
    print(f"check: MoCo losses over {len(mine)} steps, sslkit {mine[0]:.4f} -> {mine[-1]:.4f}, lightly "
          f"{theirs[0]:.4f} -> {theirs[-1]:.4f}; difference at the first step {(mine[0] - theirs[0]).abs():.1e}, "
          f"largest {(mine - theirs).abs().max():.1e} ({100 * ((mine - theirs).abs() / theirs.abs()).max():.2f} %: "
          "rounding, grown through the steps)")
    medians = {side: statistics.median(r) for side, r in rates.items()}
    for side, r in rates.items():
        print(f"{side:13s} {medians[side]:7.1f} pairs/s  (median of {len(r)}: {', '.join(f'{x:.0f}' for x in r)}); "
              f"{statistics.median(per_cpu[side]):6.1f} pairs per CPU-second")
    cpu_ratio = statistics.median(per_cpu["sslkit MoCo"]) / statistics.median(per_cpu["lightly MoCo"])
    print(f"sslkit MoCo / lightly: wall clock {medians['sslkit MoCo'] / medians['lightly MoCo']:.2f}, "
          f"per CPU-second {cpu_ratio:.2f}")
    if not args.no_memory:
        argv = [a for a in sys.argv[1:] if a != "--no-memory"]
        for side in SIDES:
            runs = [json.loads(subprocess.run([sys.executable, __file__, *argv, "--memory-child", side], check=True,
                                              capture_output=True, text=True).stdout.strip().splitlines()[-1])
                    for _ in range(2)]  # twice: the allocator's peak varies by some tens of MiB between runs
            peaks = " / ".join(f"{r['after']:.0f}" for r in runs)
            grown = " / ".join(f"{r['after'] - r['before']:.0f}" for r in runs)
            cuda = "; CUDA max allocated " + " / ".join(f"{r['cuda']:.0f}" for r in runs) + " MiB" \
                if runs[0]["cuda"] is not None else ""
            tensors = " / ".join(f"{r['tensors']:.0f}" for r in runs)
            print(f"peak memory, {side:13s}: VmHWM {peaks} MiB over {args.warmup + args.steps} steps, "
                  f"+{grown} MiB over the RSS before them; tensors allocated within a step {tensors} MiB{cuda}")
    print(f"load average {_load()} at end")
    print(f"ratio={medians['sslkit MoCo'] / medians['lightly MoCo']:.2f}")


if __name__ == "__main__":
    main()
