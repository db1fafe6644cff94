"""CCRL on two real gloo processes equals one process on the whole batch."""

import torch
from two_process import TINY_BACKBONE, compare

# Norm-free heads, like the GroupNorm backbone, do not depend on the split across ranks.
OVERRIDES = [
    *TINY_BACKBONE, "model.head_norm=false", "model.projector=[16,8]", "model.predictor=[8,8]",
    "method.queue_size=20", "method.momentum=0.9", "method.tau=0.2",
]
GLOBAL_BATCH, STEPS, SIZE = 8, 3, 16


def global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"query": torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g),
         "key": torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g),
         "label": torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)}
        for _ in range(STEPS)
    ]


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    ranks = compare(__file__, tmp_path)
    # Each rank enqueued the gathered keys of both ranks after step 0: 8 keys.
    assert ranks[0]["queue_after0"].shape == (8, 8)
    assert torch.equal(ranks[0]["queue_after0"], ranks[1]["queue_after0"])
