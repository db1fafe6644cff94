"""Online evaluation during training: every ``train.eval_every`` steps, kNN top-1 and k-means
AMI/ARI of a fixed held-out subset (the first ``eval.online_samples`` crops of ``eval.shards``).

    online = OnlineEval(cfg, device=accelerator.device)    # loads the subset once
    tracker.log(online(method), step=step)                 # every rank calls it; main gets the values

The subset is kept in memory as uint8; each rank embeds its share and the main process
scores the gathered features. The values are logged as ``online/knn_top1``, ``online/ami``,
``online/ari``, plus ``online/seconds`` and ``online/eval_share`` (the fraction of wall time
since the previous evaluation spent evaluating), so its cost is visible.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from sslkit import dist
from sslkit.config import Config, ConfigError
from sslkit.data.augment import normalize, to_pixels
from sslkit.data.loaders import eval_loader
from sslkit.data.shardset import resolve_shards
from sslkit.evaluate.scores import score_embeddings


class OnlineEval:
    def __init__(self, cfg: Config, *, device: torch.device | str, batch_size: int = 256) -> None:
        self.ev, self.seed, self.device, self.batch_size = cfg.eval, cfg.run.seed, device, batch_size
        shards = resolve_shards(cfg.eval.shards)
        images, labels = [], []
        # Building a DataLoader draws from torch's global RNG: keep training's random stream as it was.
        with torch.random.fork_rng(devices=[]):
            loader = eval_loader(shards, size=cfg.data.size, channels=cfg.data.channels, batch_size=batch_size,
                                 workers=0, rank=0, world_size=1, max_samples=cfg.eval.online_samples)
            for batch in loader:
                images.append(to_pixels(batch["image"]))
                labels.append(batch["label"])
        if not images:
            raise ConfigError(f"eval.shards '{cfg.eval.shards}' yielded no crops for online evaluation; "
                              "point it at non-empty labelled shards.")
        self.images = torch.cat(images)[: cfg.eval.online_samples]  # (N, C, H, W) uint8
        self.labels = torch.cat(labels)[: cfg.eval.online_samples].numpy()
        if (self.labels < 0).any() or len(self.labels) < 2:
            raise ConfigError(f"Online evaluation needs labelled crops: eval.shards '{cfg.eval.shards}' gave "
                              f"{int((self.labels < 0).sum())} unlabelled of {len(self.labels)}; use labelled shards.")
        self.k = cfg.eval.k or int(np.unique(self.labels).size)
        self.last = time.perf_counter()

    @torch.no_grad()
    def __call__(self, method: torch.nn.Module) -> dict[str, Any]:
        start = time.perf_counter()
        was_training = method.training
        method.eval()
        rows = torch.arange(dist.rank(), len(self.images), dist.world_size())
        feats = [method.embed(normalize(self.images[chunk].to(self.device).float() / 255),
                              encoder=self.ev.encoder, features=self.ev.features).float().cpu()
                 for chunk in rows.split(self.batch_size)]
        method.train(was_training)
        parts = dist.gather_objects((rows, torch.cat(feats) if feats else torch.empty(0)))
        if not dist.is_main_process():
            self.last = time.perf_counter()
            return {}
        order = torch.cat([p[0] for p in parts]).argsort()
        x = torch.cat([p[1] for p in parts if len(p[1])])[order].numpy()
        # As `sslkit evaluate` scores, with one k-means restart and no sample limit (the subset is small).
        blocks = score_embeddings(x, self.labels, k=self.k, restarts=1, niter=self.ev.niter, seed=self.seed,
                                  normalize=self.ev.normalize, whiten_dims=self.ev.whiten, knn_k=self.ev.knn_k,
                                  knn_tau=self.ev.knn_tau).blocks
        knn, scores = blocks["knn"], blocks["cluster"]
        now = time.perf_counter()
        seconds, share = now - start, (now - start) / max(now - self.last, 1e-9)
        self.last = now
        return {"online/knn_top1": knn["top1"], "online/ami": scores["ami"], "online/ari": scores["ari"],
                "online/samples": len(x), "online/seconds": seconds, "online/eval_share": share}
