"""Morphological features of the object at the centre of each crop (a nucleus, a chromosome):
the hand-made baseline a learned embedding should beat, as CCRL compares with one.

The object is found in the crop itself, so any shard set works, annotated masks or not: the
haematoxylin amount (``skimage.color.rgb2hed``) of an RGB crop, or the darkness of a grey one,
is thresholded with Otsu's method and the connected component at (or nearest to) the centre
is the object. Its region properties (``skimage.measure.regionprops``) and intensities are
the features, all invariant to rotation and flips:

    log area, eccentricity, solidity, extent, major/minor axis ratio, log(perimeter^2 / area),
    mean and std of the stain inside, mean stain outside, mean R, G, B (grey: the grey value)
    inside, and whether an object was found.

A crop without an object (blank, or one flat colour) gets zeros and ``found`` 0.

    feats = morphology_features(images_uint8)  # (B, C, H, W) -> (B, len(FEATURES)) float32
"""

from __future__ import annotations

import math

import numpy as np
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

FEATURES = ("log_area", "eccentricity", "solidity", "extent", "axis_ratio", "log_roundness", "stain_mean",
            "stain_std", "stain_outside", "mean_r", "mean_g", "mean_b", "found")


def stain(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 -> (H, W) float: haematoxylin amount, or darkness (1 - grey) of a grey crop."""
    if image.ndim == 3 and image.shape[2] == 3:
        return rgb2hed(image)[..., 0]
    grey = image[..., 0] if image.ndim == 3 else image
    return 1.0 - grey.astype(np.float64) / 255.0


def object_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: the Otsu-thresholded component of ``stain(image)`` at the centre, else the nearest one."""
    amount = stain(image)
    if float(np.ptp(amount)) < 1e-6:
        return np.zeros(amount.shape, bool)
    components = label(amount > threshold_otsu(amount))
    if components.max() == 0:
        return np.zeros(amount.shape, bool)
    h, w = amount.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    at_centre = components[int(round(cy)), int(round(cx))]
    if at_centre == 0:  # the component with the pixel nearest the centre
        ys, xs = np.nonzero(components)
        nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
        at_centre = components[ys[nearest], xs[nearest]]
    return components == at_centre


def crop_features(image: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) uint8 -> (len(FEATURES),) float64."""
    mask = object_mask(image)
    if not mask.any():
        return np.zeros(len(FEATURES))
    amount = stain(image)
    props = regionprops(mask.astype(np.uint8))[0]
    colour = image.reshape(*mask.shape, -1)[mask].astype(np.float64).mean(0) / 255.0
    rgb = colour if colour.size == 3 else np.repeat(colour, 3)
    minor = max(props.axis_minor_length, 1e-6)
    outside = amount[~mask].mean() if (~mask).any() else 0.0
    return np.array([
        math.log(props.area), props.eccentricity, props.solidity, props.extent, props.axis_major_length / minor,
        math.log(max(props.perimeter, 1.0) ** 2 / props.area), amount[mask].mean(), amount[mask].std(), outside,
        *rgb, 1.0,
    ])


def morphology_features(images: np.ndarray) -> np.ndarray:
    """(B, C, H, W) uint8 crops (numpy or torch) -> (B, len(FEATURES)) float32."""
    batch = np.asarray(images)
    if batch.ndim != 4:
        raise ValueError(f"morphology_features expects (B, C, H, W) crops, got shape {batch.shape}.")
    return np.stack([crop_features(np.moveaxis(crop, 0, -1)) for crop in batch]).astype(np.float32)


def standardize(feats: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Z-scores of ``feats`` and ``others`` with the mean and std of ``feats`` (constant columns: 0)."""
    ref = feats.astype(np.float64)
    mean, std = ref.mean(0), ref.std(0)
    std = np.where(std > 1e-9 * np.maximum(np.abs(mean), 1.0), std, 1.0)
    return tuple(((x.astype(np.float64) - mean) / std).astype(np.float32) for x in (feats, *others))


__all__ = ["FEATURES", "stain", "object_mask", "crop_features", "morphology_features", "standardize"]
