"""BatchViews (tensor back-end): each op agrees with torchvision's functional op per sample,
the geometric warp is exact on flips and quarter turns, and views are seeded and per-sample."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sslkit.config import ViewsConfig
from sslkit.data import augment as A

TOL = 1e-5


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_jitter_ops_match_torchvision_per_sample(images, op):
    factors = torch.tensor([0.0, 0.6, 0.9, 1.0, 1.2, 1.4])
    mine = getattr(A, f"adjust_{op}")(images, factors).clamp(0, 1)  # torchvision clamps each op
    ref = torch.stack([getattr(TF, f"adjust_{op}")(img, float(f)) for img, f in zip(images, factors)])
    torch.testing.assert_close(mine, ref, atol=TOL, rtol=0)


def test_contrast_on_one_channel_matches_torchvision():
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    factors = torch.tensor([0.5, 1.5])
    ref = torch.stack([TF.adjust_contrast(img, float(f)) for img, f in zip(x, factors)])
    torch.testing.assert_close(A.adjust_contrast(x, factors).clamp(0, 1), ref, atol=TOL, rtol=0)


def test_hue_matches_torchvision_per_sample(images):
    shifts = torch.tensor([-0.5, -0.1, -0.03, 0.0, 0.07, 0.1])
    ref = torch.stack([TF.adjust_hue(img, float(h)) for img, h in zip(images, shifts)])
    torch.testing.assert_close(A.adjust_hue(images, shifts), ref, atol=1e-5, rtol=0)


def test_hue_shift_of_pure_red_by_a_third_is_pure_green():
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    green = torch.zeros(1, 3, 2, 2)
    green[:, 1] = 1.0
    torch.testing.assert_close(A.adjust_hue(red, torch.tensor([1 / 3])), green, atol=1e-6, rtol=0)


def test_grayscale_uses_torchvision_weights(images):
    torch.testing.assert_close(A._gray(images), TF.rgb_to_grayscale(images), atol=TOL, rtol=0)


@pytest.mark.parametrize("kernel", [3, 5])
def test_blur_matches_torchvision_per_sample(images, kernel):
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 3.0])
    ref = torch.stack([TF.gaussian_blur(img, [kernel, kernel], [float(s), float(s)]) for img, s in zip(images, sigmas)])
    torch.testing.assert_close(A.gaussian_blur(images, sigmas, kernel), ref, atol=TOL, rtol=0)


def _affine(angle: float, n: int) -> torch.Tensor:
    a = torch.full((n,), angle)
    rot = torch.stack([torch.stack([a.cos(), a.sin()], 1), torch.stack([-a.sin(), a.cos()], 1)], 1)
    return torch.cat([rot, torch.zeros(n, 2, 1)], 2)


def test_warp_identity_and_quarter_turn_are_exact(images):
    torch.testing.assert_close(A.warp(images, _affine(0.0, 6)), images, atol=TOL, rtol=0)
    # pixel centres land on pixel centres: a quarter turn is torch.rot90, no interpolation
    torch.testing.assert_close(A.warp(images, _affine(math.pi / 2, 6)), torch.rot90(images, -1, (2, 3)),
                               atol=TOL, rtol=0)


def test_flips_are_exact_and_about_half_the_samples(images):
    views = A.BatchViews(ViewsConfig(rotation=0.0, flips=True), channels=3)
    x = images.repeat(50, 1, 1, 1)  # 300 samples
    theta = views.geometry(len(x), local=False, like=x, generator=torch.Generator().manual_seed(0))
    out = A.warp(x, theta)
    for i in range(len(x)):
        ref = x[i]
        if theta[i, 0, 0] < 0:
            ref = ref.flip(2)
        if theta[i, 1, 1] < 0:
            ref = ref.flip(1)
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)
    flipped_x = (theta[:, 0, 0] < 0).float().mean().item()
    assert 0.35 < flipped_x < 0.65  # binomial(300, 0.5): 5 standard deviations either side


def test_vflip_off_flips_horizontally_only(images):
    views = A.BatchViews(ViewsConfig(rotation=0.0, flips=True, vflip=False), channels=3)
    theta = views.geometry(300, local=False, like=images, generator=torch.Generator().manual_seed(0))
    assert (theta[:, 1, 1] == 1).all()  # never flipped vertically
    assert 0.35 < (theta[:, 0, 0] < 0).float().mean().item() < 0.65
    pil = A.build_views(ViewsConfig(flips=True, vflip=False), size=16, channels=3)
    names = [type(op).__name__ for op in pil.query.transforms]
    assert "RandomHorizontalFlip" in names and "RandomVerticalFlip" not in names


def test_local_crop_has_the_drawn_area_and_aspect_and_stays_inside_the_image():
    cfg = ViewsConfig(crop_scale=[0.04, 0.04], rotation=0.0, flips=False)
    views = A.BatchViews(cfg, channels=1)
    theta = views.geometry(200, local=True, like=torch.zeros(1), generator=torch.Generator().manual_seed(2))
    half_w, half_h = theta[:, 0, 0], theta[:, 1, 1]
    area = half_w * half_h  # width fraction x height fraction
    torch.testing.assert_close(area, torch.full_like(area, 0.04), atol=1e-6, rtol=0)
    aspect = half_w / half_h
    assert aspect.min() >= 3 / 4 - 1e-6 and aspect.max() <= 4 / 3 + 1e-6
    # the crop box never leaves the image
    assert (theta[:, 0, 2].abs() + half_w).max() <= 1 + 1e-6
    assert (theta[:, 1, 2].abs() + half_h).max() <= 1 + 1e-6


def test_local_crop_magnifies_a_constant_block():
    # left half 0, right half 1; a crop centred in the right half with half-extent 0.25 sees only 1s
    x = torch.zeros(1, 1, 16, 16)
    x[..., 8:] = 1.0
    theta = torch.tensor([[[0.25, 0.0, 0.5], [0.0, 0.25, 0.0]]])
    torch.testing.assert_close(A.warp(x, theta), torch.ones_like(x), atol=TOL, rtol=0)


def test_recipes_crop_only_the_local_branch():
    x = torch.zeros(8, 3, 16, 16)
    for local in ("query", "key"):
        views = A.BatchViews(ViewsConfig(local=local), channels=3)
        assert views.local == {"query": local == "query", "key": local == "key"}
    assert A.BatchViews(ViewsConfig(recipe="global_global"), channels=3).local == {"query": False, "key": False}
    assert A.BatchViews(ViewsConfig(recipe="local_local"), channels=3).local == {"query": True, "key": True}
    with pytest.raises(ValueError, match="data.views.recipe"):
        A.BatchViews(ViewsConfig(recipe="local"), channels=3)
    # a global branch's warp has unit scale: |det| of the 2x2 part is 1
    views = A.BatchViews(ViewsConfig(), channels=3)
    theta = views.geometry(8, local=False, like=x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.linalg.det(theta[:, :, :2]).abs(), torch.ones(8), atol=1e-5, rtol=0)


def test_views_are_seeded_per_sample_and_normalised(images):
    uint8 = (images * 255).round().to(torch.uint8)
    same = uint8[:1].repeat(16, 1, 1, 1)
    views = A.BatchViews(ViewsConfig(), channels=3)
    q1, k1 = views(same, generator=torch.Generator().manual_seed(5))
    q2, k2 = views(same, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(q1, q2, atol=0, rtol=0)
    torch.testing.assert_close(k1, k2, atol=0, rtol=0)
    assert q1.dtype == torch.float32 and q1.shape == same.shape
    assert q1.min() >= (0 - A.MEAN) / A.STD - 1e-6 and q1.max() <= (1 - A.MEAN) / A.STD + 1e-6
    # one image repeated: every sample drew its own parameters, so no two views are equal
    flat = q1.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(16) * 1e9
    assert distances.min() > 1e-3


def test_all_ops_off_returns_the_normalised_input(images):
    cfg = ViewsConfig(recipe="global_global", p_jitter=0.0, p_gray=0.0, p_blur=0.0, rotation=0.0, flips=False)
    uint8 = (images * 255).round().to(torch.uint8)
    q, k = A.BatchViews(cfg, channels=3)(uint8)
    expected = (uint8.float() / 255 - A.MEAN) / A.STD
    torch.testing.assert_close(q, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(k, expected, atol=TOL, rtol=0)


def test_grayscale_and_jitter_always_on_and_one_channel():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    q, _ = A.BatchViews(ViewsConfig(p_gray=1.0, p_blur=0.0), channels=3)(x)
    torch.testing.assert_close(q[:, 0], q[:, 1], atol=0, rtol=0)  # all three channels equal
    torch.testing.assert_close(q[:, 1], q[:, 2], atol=0, rtol=0)
    one = torch.rand(4, 1, 8, 8)
    q, k = A.BatchViews(ViewsConfig(p_jitter=1.0, p_gray=1.0), channels=1)(one)
    assert q.shape == one.shape and k.shape == one.shape


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="recipe"):
        A.BatchViews(ViewsConfig(recipe="nope"), channels=3)
    with pytest.raises(ValueError, match="data.channels"):
        A.BatchViews(ViewsConfig(), channels=2)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        A.BatchViews(ViewsConfig(), channels=3)(torch.zeros(2, 1, 8, 8))


def test_gamma_matches_torchvision_per_sample(images):
    values = torch.tensor([0.5, 0.8, 1.0, 1.0, 1.3, 2.0])
    ref = torch.stack([TF.adjust_gamma(img, float(v)) for img, v in zip(images, values)])
    torch.testing.assert_close(A.adjust_gamma(images, values), ref, atol=TOL, rtol=0)


def test_gamma_off_draws_nothing_and_on_moves_the_views(images):
    """gamma 0 leaves the random stream as it was (old seeds repeat their views); gamma > 0 changes them."""
    cfg = ViewsConfig(p_blur=0.0)
    base = A.BatchViews(cfg, channels=3).branch(images, local=True, generator=torch.Generator().manual_seed(3))
    again = A.BatchViews(ViewsConfig(p_blur=0.0, gamma=0.0), channels=3).branch(
        images, local=True, generator=torch.Generator().manual_seed(3))
    moved = A.BatchViews(ViewsConfig(p_blur=0.0, gamma=0.5), channels=3).branch(
        images, local=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(base, again)
    assert not torch.allclose(base, moved, atol=1e-3)
