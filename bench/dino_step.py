"""Training throughput: sslkit's DINO step against lightly's DINO building blocks, same ViT, same batch.

    python bench/dino_step.py [--backbone vit_tiny_patch16_224] [--size 64] [--patch 8] [--local-size 32]
                              [--locals 4] [--batch 64] [--prototypes 4096] [--steps 3] [--blocks 6]
                              [--threads 2] [--device cpu|cuda]

Both sides get the same timm ViT (``sslkit.models.create_backbone``, same weights, dynamic image
size), a DINO head of the same shape (hidden 2048, bottleneck 256, K ``--prototypes``, unit-norm
last layer), AdamW with sslkit's parameter groups, teacher momentum 0.996 and temperatures
(teacher 0.04, student 0.1), and identical pre-made multi-crop views (augmentation is not timed):
2 global views at ``--size`` and ``--locals`` local views at ``--local-size``.

- sslkit: ``build_method`` with ``method.name=dino``; one step is what the engine does per optimizer
  step: ``method(batch)``, ``loss.backward()``, ``before_optimizer_step``, ``optimizer.step()``,
  ``zero_grad(set_to_none=True)``, ``after_optimizer_step`` (teacher EMA and centre).
- lightly 1.6: its DINO example's step: ``update_momentum`` of backbone and head, the teacher
  (``deactivate_requires_grad`` copy) on the global views, the student on every view (views of one
  size concatenated, as sslkit does, so both run the backbone the same number of times),
  ``DINOProjectionHead``, ``DINOLoss`` (its centre updated inside), backward,
  ``cancel_gradients_last_layer`` (lightly's freeze), step, ``zero_grad()``.

Blocks of ``--steps`` steps alternate (the order swapped every round) after a warm-up step each;
medians of images per second. The last line is ``ratio=<sslkit / lightly>``, wall clock.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the sslkit command does before torch loads OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from lightly.loss import DINOLoss  # noqa: E402
from lightly.models.modules.heads import DINOProjectionHead  # noqa: E402
from lightly.models.utils import deactivate_requires_grad, update_momentum  # noqa: E402
from torch import nn  # noqa: E402

from sslkit.config import load_config  # noqa: E402
from sslkit.methods import build_method  # noqa: E402
from sslkit.methods.dino import vit_tokens  # noqa: E402
from sslkit.optim import build_optimizer  # noqa: E402


def sslkit_config(args: argparse.Namespace):  # noqa: ANN201 -- a Config
    return load_config(None, [
        "method.name=dino", f"model.backbone={args.backbone}", f"model.backbone_kwargs={{patch_size: {args.patch}}}",
        f"data.size={args.size}", f"data.views.local_size={args.local_size}", f"data.views.local_crops={args.locals}",
        f"method.prototypes={args.prototypes}", "method.teacher_temp=[0.04,0.04]",
        "method.teacher_temp_warmup_epochs=0", "method.freeze_last_layer_epochs=0", "optim.name=adamw",
        "optim.lr=1e-4", "optim.weight_decay=0.04",
        f"data.batch_size={args.batch}", "train.max_steps=1000"])


def make_views(args: argparse.Namespace, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"globals": [torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device) for _ in range(2)],
            "locals": [torch.randn(args.batch, 3, args.local_size, args.local_size, generator=g).to(device)
                       for _ in range(args.locals)]}


class LightlyDINO(nn.Module):
    """lightly's DINO example around a timm ViT: student backbone + head, teacher copies."""

    def __init__(self, backbone: nn.Module, prototypes: int) -> None:
        super().__init__()
        dim = backbone.num_features
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(dim, 2048, 256, prototypes, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(dim, 2048, 256, prototypes)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student_head(vit_tokens(self.student_backbone, x)[0])

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(vit_tokens(self.teacher_backbone, x)[0])


def build_sides(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[int], float]]:
    cfg, views = sslkit_config(args), make_views(args, device)
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    optimizer = build_optimizer(cfg.optim, model=method)

    def sslkit_step(i: int) -> float:
        out = method(views)
        out.loss.backward()
        method.before_optimizer_step(i)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(i)
        return float(out.loss)

    torch.manual_seed(0)
    peer = LightlyDINO(copy.deepcopy(method.student["backbone"]), args.prototypes).to(device)
    peer_opt = build_optimizer(cfg.optim, model=peer)
    criterion = DINOLoss(output_dim=args.prototypes, warmup_teacher_temp=0.04, teacher_temp=0.04,
                         warmup_teacher_temp_epochs=0).to(device)

    def lightly_step(i: int) -> float:
        update_momentum(peer.student_backbone, peer.teacher_backbone, m=0.996)
        update_momentum(peer.student_head, peer.teacher_head, m=0.996)
        with torch.no_grad():
            teacher = list(peer.forward_teacher(torch.cat(views["globals"])).chunk(2))
        student = list(peer(torch.cat(views["globals"])).chunk(2))
        student += list(peer(torch.cat(views["locals"])).chunk(len(views["locals"])))
        loss = criterion(teacher, student, epoch=0)
        loss.backward()
        peer.student_head.cancel_last_layer_gradients(current_epoch=1)
        peer_opt.step()
        peer_opt.zero_grad()
        return float(loss)

    return {"sslkit": sslkit_step, "lightly": lightly_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--local-size", type=int, default=32)
    parser.add_argument("--locals", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sides = build_sides(args, device)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    step = 0
    for fn in sides.values():  # warm-up
        fn(step)
    for block in range(args.blocks):
        for name in (list(sides) if block % 2 == 0 else list(sides)[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step += 1
                sides[name](step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
    print(f"{args.backbone} patch {args.patch}, {args.batch} images x (2 x {args.size} px + {args.locals} x "
          f"{args.local_size} px), K {args.prototypes}, {args.threads} threads, {device}; load average now "
          f"{os.getloadavg()[0]:.2f}")
    for name, values in rates.items():
        print(f"{name:8s} {statistics.median(values):8.1f} images/s (median of {len(values)} blocks of "
              f"{args.steps} steps; min {min(values):.1f}, max {max(values):.1f})")
    print(f"ratio={statistics.median(rates['sslkit']) / statistics.median(rates['lightly']):.2f}")


if __name__ == "__main__":
    main()
