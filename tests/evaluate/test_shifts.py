"""Simulated acquisition shifts: each agrees with torchvision's functional op, or with what it
must do to an image whose answer is known by hand."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sslkit.evaluate import shifts as S


@pytest.fixture
def gray() -> torch.Tensor:
    return torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("factor", [0.6, 1.5])
def test_contrast_is_torchvisions(gray, factor):
    ref = torch.stack([TF.adjust_contrast(img, factor) for img in gray])
    torch.testing.assert_close(S.contrast(factor)(gray), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", [0.6, 1.6])
def test_gamma_is_torchvisions(gray, value):
    ref = torch.stack([TF.adjust_gamma(img, value) for img in gray])
    torch.testing.assert_close(S.gamma(value)(gray), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_is_torchvisions_with_a_three_sigma_kernel(gray, sigma):
    kernel = {1.0: 7, 2.0: 13}[sigma]
    ref = torch.stack([TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma]) for img in gray])
    torch.testing.assert_close(S.blur(sigma)(gray), ref, atol=1e-5, rtol=0)


def test_blur_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="at least 13 pixels"):
        S.blur(2.0)(torch.zeros(1, 1, 8, 8))


def test_lower_resolution_erases_detail_finer_than_it_and_keeps_coarse_detail():
    fine = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2  # a one-pixel checkerboard
    fine = fine.float().expand(2, 1, 32, 32)
    # down-sampling by 2 with antialiasing averages each 2x2 block: a flat 0.5 (up to the border)
    out = S.resolution(2)(fine)
    torch.testing.assert_close(out[..., 4:-4, 4:-4], torch.full_like(out[..., 4:-4, 4:-4], 0.5), atol=1e-5, rtol=0)
    coarse = torch.zeros(2, 1, 32, 32)
    coarse[..., :, 16:] = 1.0  # one edge: left half dark, right half bright
    out = S.resolution(2)(coarse)
    assert out[..., :, :12].max() < 1e-6 and out[..., :, 20:].min() > 1 - 1e-6  # away from the edge: kept
    assert out.shape == coarse.shape


def test_shifts_keep_shape_and_range_and_none_is_identity(gray):
    for name in ("none", *S.SHIFTS):
        out = S.get_shift(name)(gray)
        assert out.shape == gray.shape
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(S.get_shift("none")(gray), gray)
    moved = [name for name in S.SHIFTS if not torch.allclose(S.get_shift(name)(gray), gray, atol=1e-3)]
    assert moved == list(S.SHIFTS)  # every shift changes the images


def test_an_unknown_shift_names_the_known_ones():
    with pytest.raises(ValueError, match="gamma-0.6"):
        S.get_shift("gamma-2")
