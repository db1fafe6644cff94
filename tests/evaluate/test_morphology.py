"""The morphology baseline: the object found in a crop, and its features against scikit-image's
regionprops of the drawn mask and the analytic values of an ellipse."""

import math

import numpy as np
import pytest
from skimage.draw import ellipse
from skimage.measure import regionprops

from sslkit.evaluate import morphology as M

PINK, PURPLE = (235, 170, 210), (80, 40, 140)  # eosin background, haematoxylin nucleus


def _crop(size=48, centre=(24, 24), axes=(12, 6), angle=0.3, colour=PURPLE, background=PINK, seed=0):
    """(size, size, 3) uint8 with a filled ellipse, a little noise, and the drawn mask."""
    image = np.empty((size, size, 3), np.float64)
    image[:] = background
    rr, cc = ellipse(*centre, *axes, shape=(size, size), rotation=angle)
    image[rr, cc] = colour
    image += np.random.default_rng(seed).normal(0, 3, image.shape)
    mask = np.zeros((size, size), bool)
    mask[rr, cc] = True
    return np.clip(image, 0, 255).astype(np.uint8), mask


def test_the_drawn_nucleus_is_found():
    image, drawn = _crop()
    found = M.object_mask(image)
    assert (found & drawn).sum() / (found | drawn).sum() > 0.97


def test_features_equal_regionprops_of_the_drawn_mask_and_the_ellipse():
    image, drawn = _crop(axes=(12, 6))
    f = dict(zip(M.FEATURES, M.crop_features(image)))
    props = regionprops(drawn.astype(np.uint8))[0]
    assert f["log_area"] == pytest.approx(math.log(props.area), abs=0.03)
    assert f["eccentricity"] == pytest.approx(props.eccentricity, abs=0.01)
    assert f["solidity"] == pytest.approx(props.solidity, abs=0.01)
    assert f["axis_ratio"] == pytest.approx(props.axis_major_length / props.axis_minor_length, rel=0.02)
    # and the analytic ellipse of semi-axes 12 and 6
    assert math.exp(f["log_area"]) == pytest.approx(math.pi * 12 * 6, rel=0.05)
    assert f["eccentricity"] == pytest.approx(math.sqrt(1 - (6 / 12) ** 2), abs=0.02)
    assert f["axis_ratio"] == pytest.approx(2.0, rel=0.05) and f["found"] == 1.0
    assert f["mean_r"] == pytest.approx(80 / 255, abs=0.02) and f["stain_mean"] > f["stain_outside"]


def test_features_do_not_change_with_rotation_and_flips():
    image, _ = _crop(angle=0.0)
    base = M.crop_features(image)
    for turned in (np.rot90(image), np.fliplr(image), np.flipud(np.rot90(image, 3))):
        np.testing.assert_allclose(M.crop_features(np.ascontiguousarray(turned)), base, rtol=1e-6, atol=1e-9)


def test_the_object_at_the_centre_is_taken_not_the_largest():
    image, small = _crop(axes=(5, 4))
    big_rr, big_cc = ellipse(6, 6, 6, 6, shape=image.shape[:2])
    image[big_rr, big_cc] = PURPLE  # a larger neighbour in the corner
    found = M.object_mask(image)
    assert (found & small).sum() / (found | small).sum() > 0.9
    off, drawn = _crop(centre=(30, 30), axes=(5, 5))  # nothing at the centre: the nearest object
    assert (M.object_mask(off) & drawn).sum() / drawn.sum() > 0.9


def test_blank_and_grey_crops():
    assert M.crop_features(np.full((32, 32, 3), 200, np.uint8)).tolist() == [0.0] * len(M.FEATURES)
    grey = np.full((40, 40), 250, np.uint8)
    rr, cc = ellipse(20, 20, 14, 4, shape=grey.shape)
    grey[rr, cc] = 40  # a dark chromosome on white
    f = dict(zip(M.FEATURES, M.crop_features(grey)))
    assert f["found"] == 1 and math.exp(f["log_area"]) == pytest.approx(math.pi * 14 * 4, rel=0.06)
    assert f["mean_r"] == f["mean_g"] == f["mean_b"] == pytest.approx(40 / 255, abs=0.01)


def test_batches_and_standardisation():
    crops = np.stack([np.moveaxis(_crop(axes=(4 + i, 4), seed=i)[0], -1, 0) for i in range(6)])
    feats = M.morphology_features(crops)
    assert feats.shape == (6, len(M.FEATURES)) and feats.dtype == np.float32
    assert np.all(np.diff(feats[:, 0]) > 0)  # the area grows with the axis
    z, other = M.standardize(feats, feats[:2])
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(other, z[:2], atol=1e-6)
    assert np.all(z[:, M.FEATURES.index("found")] == 0)  # a constant column stays 0, not nan
    with pytest.raises(ValueError, match="expects"):
        M.morphology_features(crops[0])
