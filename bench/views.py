"""Two-view augmentation throughput: the tensor back-end (BatchViews, whole batches) against
the PIL back-end (torchvision v2 on one PIL image at a time), same recipe, same process.

    python bench/views.py [--batch 256] [--size 32] [--batches 20] [--device cpu|cuda] [--threads 2]

Prints crop pairs per second for each and the ratio. Images come from the synthetic demo
generator; both back-ends start from decoded crops (uint8 tensors / PIL images), so decoding
is not timed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from sslkit.config import ViewsConfig
from sslkit.data.augment import BatchViews, build_views
from sslkit.sharding.synthetic import render_batch


def _rate(fn, pairs: int, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return pairs * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, _ = render_batch(range(args.batch), size=args.size, seed=0)  # (B, H, W, 3) uint8
    pil = [Image.fromarray(np.ascontiguousarray(img)) for img in images]
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(args.device)
    cfg = ViewsConfig()

    two_views = build_views(cfg, size=args.size, channels=3)
    pil_rate = _rate(lambda: [two_views(img) for img in pil], args.batch, max(1, args.batches // 4))

    batch_views = BatchViews(cfg, channels=3)
    generator = torch.Generator(device=args.device).manual_seed(0)

    def tensor_views() -> None:
        batch_views(batch, generator=generator)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    tensor_rate = _rate(tensor_views, args.batch, args.batches)
    print(f"{args.size}x{args.size} crops, batch {args.batch}, {args.threads} threads, device {args.device}")
    print(f"PIL back-end (per image, one process): {pil_rate:8.0f} pairs/s")
    print(f"tensor back-end (BatchViews):          {tensor_rate:8.0f} pairs/s")
    print(f"ratio tensor / PIL: {tensor_rate / pil_rate:.2f}x")


if __name__ == "__main__":
    main()
