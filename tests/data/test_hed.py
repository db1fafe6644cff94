"""HED stain jitter (data.views.hed): the optical-density transform agrees with scikit-image's
rgb2hed / hed2rgb, zero jitter is the identity, given factors give scikit-image's result, and the
config refuses it where it cannot run. Its random factors are checked in test_view_distributions.py."""

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed

from sslkit.config import ConfigError, load_config
from sslkit.data import augment as A


def _nchw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None])).float()


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).double().numpy()


def _stained(seed: int = 0, side: int = 24) -> np.ndarray:
    """(side, side, 3) RGB made from non-negative H, E and DAB amounts, as a stained section is."""
    stains = np.random.default_rng(seed).uniform(0.0, 0.2, size=(side, side, 3))
    return hed2rgb(stains)


def test_rgb_to_hed_is_rgb2hed_before_its_clip_at_zero():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, size=(32, 32, 3))
    image[0, :4] = [[0, 0, 0], [1, 1, 1], [1, 0, 0], [0.5, 0.2, 0.9]]  # black, white, extremes
    ours = _hwc(A.rgb_to_hed(_nchw(image)))
    np.testing.assert_allclose(np.maximum(ours, 0), rgb2hed(image), atol=2e-6)
    assert (ours < -1e-3).any()  # random colours do have negative amounts, which rgb2hed clips


def test_hed_to_rgb_is_hed2rgb():
    stains = np.random.default_rng(2).uniform(-0.1, 0.6, size=(16, 16, 3))
    np.testing.assert_allclose(_hwc(A.hed_to_rgb(_nchw(stains))), hed2rgb(stains), atol=2e-6)


def test_zero_jitter_is_the_identity():
    image = np.random.default_rng(3).integers(1, 256, size=(32, 32, 3)) / 255.0  # every 8-bit value but 0
    x = _nchw(image)
    out = A.jitter_hed(x, torch.ones(1, 3), torch.zeros(1, 3))
    np.testing.assert_allclose(_hwc(out), image, atol=2e-5)


def test_given_factors_give_scikit_images_result():
    image = _stained()
    scale, shift = np.array([1.2, 0.8, 1.05]), np.array([0.03, -0.02, 0.0])
    expected = hed2rgb(rgb2hed(image) * scale + shift)
    out = A.jitter_hed(_nchw(image), torch.from_numpy(scale[None]).float(), torch.from_numpy(shift[None]).float())
    np.testing.assert_allclose(_hwc(out), expected, atol=1e-5)
    assert np.abs(expected - image).max() > 0.05  # the factors do change the image


def test_each_sample_gets_its_own_factors_and_other_ops_are_unchanged():
    from sslkit.config import ViewsConfig

    x = _nchw(_stained()).repeat(4, 1, 1, 1)
    plain = dict(recipe="global_global", p_jitter=0.0, p_gray=0.0, p_blur=0.0, rotation=0.0, flips=False)
    views = A.BatchViews(ViewsConfig(**plain, hed=0.1), channels=3)
    out = views.branch(x, local=False, generator=torch.Generator().manual_seed(0))
    assert all(not torch.allclose(out[0], out[i], atol=1e-3) for i in (1, 2, 3))
    off = A.BatchViews(ViewsConfig(**plain), channels=3).branch(x, local=False)
    torch.testing.assert_close(off, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("overrides", [["data.views.backend=pil"], ["data.channels=1", "model.in_chans=1"]])
def test_config_refuses_hed_where_it_cannot_run(overrides):
    with pytest.raises(ConfigError, match="'data.views.hed' is 0.05: HED stain jitter is made by the tensor back-end"):
        load_config(None, ["data.views.hed=0.05", *overrides])
    with pytest.raises(ConfigError, match=r"'data.views.hed' must be in \[0, 1\]"):
        load_config(None, ["data.views.hed=1.5"])
    assert load_config(None, ["data.views.hed=0.05"]).data.views.hed == 0.05
