"""View recipes: shapes, which branch crops, normalisation, grayscale, rotation fill."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sslkit.config import ViewsConfig
from sslkit.data.augment import MEAN, STD, build_eval_transform, build_views

SIZE = 32


def _image(mode: str = "RGB", size: int = 40, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _deterministic(**overrides) -> ViewsConfig:
    """Every random op off except the local branch's crop (kept well below full size)."""
    fields = dict(p_jitter=0.0, p_gray=0.0, p_blur=0.0, rotation=0.0, flips=False, crop_scale=[0.2, 0.5])
    return ViewsConfig(**{**fields, **overrides})


@pytest.mark.parametrize("recipe", ["local_global", "global_global"])
@pytest.mark.parametrize("channels,mode", [(3, "RGB"), (3, "RGBA"), (1, "L"), (1, "RGB")])
def test_views_shapes_and_dtype(recipe: str, channels: int, mode: str) -> None:
    views = build_views(ViewsConfig(recipe=recipe), size=SIZE, channels=channels)
    torch.manual_seed(0)
    for seed in range(5):
        query, key = views(_image(mode, seed=seed))
        for view in (query, key):
            assert view.shape == (channels, SIZE, SIZE) and view.dtype == torch.float32
            assert view.min() >= -1.0 - 1e-6 and view.max() <= 1.0 + 1e-6  # (x - 0.5) / 0.5 of [0, 1]


def test_local_query_key_is_the_global_transform() -> None:
    img, plain = _image(), build_eval_transform(size=SIZE, channels=3)
    torch.manual_seed(0)
    query, key = build_views(_deterministic(local="query"), size=SIZE, channels=3)(img)
    assert torch.equal(key, plain(img))
    assert not torch.allclose(query, plain(img), atol=0.05)


def test_local_key_swaps_the_branches() -> None:
    img, plain = _image(), build_eval_transform(size=SIZE, channels=3)
    torch.manual_seed(0)
    query, key = build_views(_deterministic(local="key"), size=SIZE, channels=3)(img)
    assert torch.equal(query, plain(img))
    assert not torch.allclose(key, plain(img), atol=0.05)


def test_global_global_never_crops() -> None:
    img, plain = _image(), build_eval_transform(size=SIZE, channels=3)
    query, key = build_views(_deterministic(recipe="global_global"), size=SIZE, channels=3)(img)
    assert torch.equal(query, plain(img)) and torch.equal(key, plain(img))


def test_random_ops_change_the_global_view() -> None:
    img, plain = _image(), build_eval_transform(size=SIZE, channels=3)
    torch.manual_seed(0)
    views = build_views(ViewsConfig(p_jitter=1.0), size=SIZE, channels=3)
    assert not any(torch.equal(views(img)[1], plain(img)) for _ in range(3))


def test_grayscale_jitters_without_hue() -> None:
    views = build_views(ViewsConfig(p_jitter=1.0, p_gray=1.0), size=SIZE, channels=1)
    torch.manual_seed(0)
    query, key = views(_image("L"))
    assert query.shape == key.shape == (1, SIZE, SIZE)


def test_eval_normalisation_is_fixed() -> None:
    plain = build_eval_transform(size=SIZE, channels=3)
    white = plain(Image.new("RGB", (20, 20), (255, 255, 255)))
    black = plain(Image.new("RGB", (20, 20), (0, 0, 0)))
    assert torch.allclose(white, torch.full_like(white, (1 - MEAN) / STD))
    assert torch.allclose(black, torch.full_like(black, (0 - MEAN) / STD))


def test_rotation_reflects_the_background_by_default() -> None:
    """A flat crop stays flat: the corners a rotation uncovers repeat the crop, not a constant."""
    grey = Image.new("RGB", (SIZE, SIZE), (100, 100, 100))
    cfg = _deterministic(recipe="global_global", rotation=180.0)
    torch.manual_seed(0)
    reflected = build_views(cfg, size=SIZE, channels=3)(grey)[0]
    assert torch.allclose(reflected, torch.full_like(reflected, (100 / 255 - MEAN) / STD), atol=1e-5)
    filled = build_views(cfg, size=SIZE, channels=3, rotation_fill=255)
    assert any(filled(grey)[0].max() > reflected.max() + 0.5 for _ in range(3))  # white corners


def test_unknown_recipe_names_the_key() -> None:
    with pytest.raises(ValueError, match="data.views.recipe"):
        build_views(ViewsConfig(recipe="nope"), size=SIZE, channels=3)
    with pytest.raises(ValueError, match="data.channels"):
        build_eval_transform(size=SIZE, channels=4)
