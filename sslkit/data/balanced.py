"""Class-balanced batches from a resampled shard stream: P classes x K samples each.

Each DataLoader worker keeps a bounded buffer per class (``buffer`` samples; once full, a
new sample replaces a random one). As soon as P classes hold at least K samples each, P of
them are drawn and K samples taken from each. A batch is laid out as K blocks of P, classes
in ascending order within each block:

    labels = [c1, c2, ..., cP, c1, c2, ..., cP, ...]     (K blocks)

so ``batch[:P]`` and ``batch[P:2P]`` are SCL's paired batches B1, B2, row i of both being
class c_i. Draws come from the worker's stream RNG, which the stream
reseeds from (seed, epoch, global worker), so a resumed run sees the same batches.
Unlabelled samples (label -1) cannot be balanced: they are skipped and counted.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)
MAX_SAMPLES_WITHOUT_BATCH = 200_000


class BalancedBatches:
    """Stage: samples {"label": int, ...} -> collated batches of ``classes`` x ``per_class`` samples."""

    def __init__(self, *, classes: int, per_class: int, buffer: int, rng: random.Random,
                 collate: Callable[[list[dict]], Any]) -> None:
        if classes < 1 or per_class < 1 or buffer < per_class:
            raise ValueError(f"Balanced batches need classes >= 1, per_class >= 1 and buffer >= per_class; got "
                             f"{classes}, {per_class} and {buffer}.")
        self.classes, self.per_class, self.buffer, self.rng, self.collate = classes, per_class, buffer, rng, collate

    def __call__(self, src: Iterator[dict]) -> Iterator[Any]:
        buffers: dict[int, list[dict]] = {}
        ready: set[int] = set()  # classes holding at least per_class samples
        since, unlabelled = 0, 0
        for sample in src:
            label = int(sample["label"])
            if label < 0:
                unlabelled += 1
                if unlabelled == 1:
                    logger.warning("Balanced batches skip samples without a label (the first: %s).",
                                   sample.get("id", "?"))
                continue
            kept = buffers.setdefault(label, [])
            if len(kept) < self.buffer:
                kept.append(sample)
            else:
                kept[self.rng.randrange(self.buffer)] = sample
            if len(kept) >= self.per_class:
                ready.add(label)
            since += 1
            if len(ready) >= self.classes:
                chosen = sorted(self.rng.sample(sorted(ready), self.classes))
                taken = [[buffers[c].pop(self.rng.randrange(len(buffers[c]))) for _ in range(self.per_class)]
                         for c in chosen]
                ready.difference_update(c for c in chosen if len(buffers[c]) < self.per_class)
                since = 0
                yield self.collate([taken[i][k] for k in range(self.per_class) for i in range(len(chosen))])
            elif since > MAX_SAMPLES_WITHOUT_BATCH:
                raise RuntimeError(
                    f"{since} samples in a row made no balanced batch: only {len(buffers)} classes "
                    f"({len(ready)} with {self.per_class} samples) for data.balanced.classes={self.classes}; "
                    "lower data.balanced.classes or data.balanced.per_class."
                )
