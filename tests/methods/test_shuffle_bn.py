"""Shuffle-BN (method.shuffle_bn): the key encoder sees a share of the batch shuffled across ranks.

Two real gloo processes each hold half of a global batch; with shuffle-BN each rank's key
encoder (BatchNorm in training mode) must compute the keys of the samples that the shared
permutation sends to it, so the gathered keys equal one process running the key encoder on
the permuted halves and putting the rows back in order.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/methods/test_shuffle_bn.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

from sslkit import dist
from sslkit.config import load_config
from sslkit.methods import build_method

# BatchNorm in the backbone (the default) and in the projector: the statistics are what shuffle-BN changes.
OVERRIDES = ["model.backbone_kwargs.width=4", "model.head_norm=true", "model.projector=[16,8]",
             "model.predictor=[8,8]", "method.queue_size=32", "method.shuffle_bn=true"]
BATCH, SIZE = 8, 16


def _method(*extra: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(load_config(None, [*OVERRIDES, *extra])).train()


def _images() -> torch.Tensor:
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def _worker(out: Path) -> None:
    torch_dist.init_process_group("gloo")
    rank, world = dist.rank(), dist.world_size()
    method = _method()
    torch.manual_seed(100 + rank)  # the ranks would draw different permutations: only rank 0's may count
    half = BATCH // world
    local, keys = method.encode_keys(_images()[rank * half:(rank + 1) * half])
    order = dist.shuffle_across_ranks(torch.zeros(half, 1))[1]  # the next draw, to check it is shared
    torch.save({"world": world, "local": local, "keys": keys, "next_order": order}, out / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_keys_come_from_the_shuffled_shares_on_two_processes(tmp_path):
    from processes import run_two_ranks  # tests/ (the ranks run this file as a script, without it)

    ranks = run_two_ranks(__file__, out=tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    assert torch.equal(ranks[0]["keys"], ranks[1]["keys"])  # gathered keys identical on both ranks
    assert torch.equal(ranks[0]["next_order"], ranks[1]["next_order"])  # rank 0's permutation, broadcast

    method = _method()  # same weights as the ranks (seed 0)
    order = torch.randperm(BATCH, generator=torch.Generator().manual_seed(100))  # rank 0's draw
    images = _images()
    key_encoder = method.key_encoder
    with torch.no_grad():
        shuffled = [torch.nn.functional.normalize(key_encoder(images[order[r * 4:(r + 1) * 4]]), dim=1)
                    for r in (0, 1)]
    expected = torch.empty(BATCH, 8)
    expected[order] = torch.cat(shuffled)
    torch.testing.assert_close(ranks[0]["keys"], expected, rtol=1e-5, atol=1e-6)
    for r in (0, 1):  # each rank's own keys are its rows of the gathered keys
        torch.testing.assert_close(ranks[r]["local"], expected[r * 4:(r + 1) * 4], rtol=1e-5, atol=1e-6)
    # Without the shuffle, the halves' BatchNorm statistics give other keys: the check has power.
    with torch.no_grad():
        plain = torch.cat([torch.nn.functional.normalize(key_encoder(images[r * 4:(r + 1) * 4]), dim=1)
                           for r in (0, 1)])
    assert not torch.allclose(plain, expected, atol=1e-3)


def test_one_process_shuffle_changes_nothing():
    # One rank: the permutation stays inside the batch, and BatchNorm statistics do not depend on order.
    images = _images()
    shuffled = _method().encode_keys(images)
    plain = _method("method.shuffle_bn=false").encode_keys(images)
    torch.testing.assert_close(shuffled[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled[1], plain[1], rtol=1e-5, atol=1e-6)


def test_unshuffle_inverts_the_shuffle():
    x = torch.arange(12.0).view(6, 2)
    share, order = dist.shuffle_across_ranks(x)
    assert sorted(order.tolist()) == list(range(6))
    torch.testing.assert_close(share, x[order])
    torch.testing.assert_close(dist.unshuffle_gathered(share, order), x)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
