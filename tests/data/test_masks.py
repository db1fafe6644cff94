"""block_masks: iBOT/BEiT block-wise patch masks — counts, shares, reproducibility, block shape."""

from __future__ import annotations

import time

import pytest
import torch

from sslkit.data.masks import block_masks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _neighbour_fraction(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """The fraction of masked patches that have a masked 4-neighbour."""
    m = mask.view(*grid)
    padded = torch.nn.functional.pad(m.float()[None, None], (1, 1, 1, 1))[0, 0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return ((neighbours > 0) & m).sum().item() / max(m.sum().item(), 1)


@pytest.mark.parametrize("n, grid, share, ratio", [(16, (14, 14), 0.5, (0.1, 0.5)), (7, (8, 12), 0.3, (0.2, 0.6)),
                                                   (32, (14, 14), 1.0, (0.3, 0.3)), (5, (6, 6), 0.0, (0.1, 0.5))])
def test_shape_share_and_counts(n: int, grid: tuple[int, int], share: float, ratio: tuple[float, float]) -> None:
    patches = grid[0] * grid[1]
    for seed in range(5):
        masks = block_masks(n, grid, ratio=ratio, share=share, generator=_gen(seed))
        assert masks.shape == (n, patches) and masks.dtype == torch.bool
        counts = masks.sum(dim=1)
        masked_rows = counts > 0
        assert int(masked_rows.sum()) == int(n * share + 0.5)  # round(n * share), halves up
        low, high = round(ratio[0] * patches), round(ratio[1] * patches)
        assert ((counts[masked_rows] >= low) & (counts[masked_rows] <= high)).all(), (counts, low, high)


def test_ratios_spread_over_the_range() -> None:
    # Stratified: the j-th of m masked images draws its ratio in the j-th of m equal strata of [0.1, 0.5].
    masks = block_masks(256, (14, 14), generator=_gen(0))
    fractions = torch.sort(masks.sum(dim=1)[masks.any(dim=1)].double() / 196).values
    assert fractions.numel() == 128
    strata = 0.1 + 0.4 * torch.arange(129, dtype=torch.float64) / 128
    slack = 0.5 / 196 + 1e-12  # the count is rounded to whole patches
    assert ((fractions >= strata[:-1] - slack) & (fractions <= strata[1:] + slack)).all()


def test_which_images_are_masked_varies_with_the_draw() -> None:
    rows = [block_masks(8, (14, 14), generator=_gen(seed)).any(dim=1) for seed in range(20)]
    assert len({tuple(r.tolist()) for r in rows}) > 5
    assert torch.stack(rows).any(dim=0).all()  # every position gets a mask in some draw


def test_same_generator_state_same_masks_other_seed_other_masks() -> None:
    a = block_masks(64, (14, 14), generator=_gen(123))
    b = block_masks(64, (14, 14), generator=_gen(123))
    c = block_masks(64, (14, 14), generator=_gen(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)  # no generator: the default one, reproducible through torch.manual_seed
    d = block_masks(16, (14, 14))
    torch.manual_seed(5)
    assert torch.equal(d, block_masks(16, (14, 14)))


def test_masks_are_blocks_not_scattered_patches() -> None:
    masks = block_masks(256, (14, 14), ratio=(0.2, 0.5), generator=_gen(7))
    masked = [m for m in masks if m.any()]
    # Every mask of >= 20% of the grid has at least one masked patch with a masked 4-neighbour ...
    fractions = torch.tensor([_neighbour_fraction(m, (14, 14)) for m in masked])
    assert (fractions > 0).all()
    # ... and nearly all masked patches have one (rectangles; only the top-up adds lone patches), while
    # as many patches scattered uniformly at random have a masked neighbour far less often.
    scattered = []
    for i, m in enumerate(masked):
        order = torch.randperm(196, generator=_gen(1000 + i))[:int(m.sum())]
        s = torch.zeros(196, dtype=torch.bool)
        s[order] = True
        scattered.append(_neighbour_fraction(s, (14, 14)))
    assert fractions.mean() > 0.9 and fractions.min() > 0.7
    assert torch.tensor(scattered).mean() < fractions.mean() - 0.15


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ratio"):
        block_masks(4, (14, 14), ratio=(0.5, 0.1))
    with pytest.raises(ValueError, match="share"):
        block_masks(4, (14, 14), share=1.5)
    with pytest.raises(ValueError, match="grid"):
        block_masks(4, (0, 14))


def test_a_batch_of_256_on_14_by_14_takes_milliseconds() -> None:
    g = _gen(0)
    block_masks(256, (14, 14), generator=g)
    start = time.perf_counter()
    for _ in range(5):
        block_masks(256, (14, 14), generator=g)
    assert (time.perf_counter() - start) / 5 < 0.1  # about 4 ms here; generous for a loaded machine
