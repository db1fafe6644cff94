"""Where the tissue is: a mask from a slide's low-resolution overview, and what it covers.

Stain-agnostic (H&E, IHC/DAB, pale stains): tissue is coloured, glass is grey-white. The
saturation of an area-averaged overview is thresholded by Otsu, kept within fixed bounds and
above the glass's own level, with hysteresis so pale stain joined to clear tissue stays in;
green/blue marker and black are excluded; holes are filled and specks removed by their size
in um^2, so the result does not depend on the scanner's magnification.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sslkit.atomic import replacing

SAT_HIGH, SAT_LOW = (0.07, 0.15), 0.04  # bounds of the Otsu threshold; floor of the hysteresis low
SPECK_UM2, HOLE_UM2 = 10_000.0, 40_000.0  # tissue pieces smaller than 0.01 mm^2 dropped; holes < 0.04 mm^2 filled


def tissue_mask(rgb: np.ndarray, *, um_per_px: float) -> np.ndarray:
    """(H, W, 3) uint8 overview of a slide -> (H, W) bool, True on tissue (see the module notes).

    Stain-agnostic (H&E, IHC/DAB, pale stains): tissue is coloured, glass is grey-white.
    """
    from scipy import ndimage
    from skimage import filters, morphology

    r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)  # (H, W) uint8
    sat = (hi - lo) / np.maximum(hi, 1).astype(np.float32)  # the overview is area-averaged: no more smoothing
    otsu = float(filters.threshold_otsu(sat)) if np.ptp(sat) > 1e-6 else SAT_HIGH[1]
    glass = sat[sat < otsu]  # (and pale tissue): the glass's own tint and noise set the low threshold
    level = float(np.median(glass)) if glass.size else 0.0
    low = max(SAT_LOW, level + 6.0 * float(np.median(np.abs(glass - level))) if glass.size else 0.0)  # ~4 sigma
    high = max(float(np.clip(otsu, *SAT_HIGH)), low)
    tissue = filters.apply_hysteresis_threshold(sat, low, high)
    marker = (sat > 0.2) & (g >= r) & ((g >= b) | (sat > 0.5))  # green/cyan ink; saturated blue ink
    tissue &= ~marker & (hi > 38)  # and nothing black (ink, dirt, scanner edges)
    tissue = ndimage.binary_closing(tissue, structure=np.ones((3, 3), bool), border_value=1) | tissue
    px = um_per_px * um_per_px
    tissue = morphology.remove_small_holes(tissue, max_size=int(HOLE_UM2 / px))
    return morphology.remove_small_objects(tissue, max_size=int(SPECK_UM2 / px))


def box_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box (N, 4) = x0, y0, x1, y1 in fractional mask pixels that is True -> (N,).

    Exact for fractional edges: the integral of a pixelwise-constant mask is bilinear within
    each pixel, so the summed-area table is interpolated bilinearly at the corners.
    """
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), dtype=np.int32)  # masks have at most MASK_MAX_SIDE ** 2 pixels
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.clip(x, 0, w), np.clip(y, 0, h)
        i, j = np.minimum(np.floor(x).astype(int), w - 1), np.minimum(np.floor(y).astype(int), h - 1)
        fx, fy = x - i, y - j
        return ((1 - fy) * ((1 - fx) * table[j, i] + fx * table[j, i + 1])
                + fy * ((1 - fx) * table[j + 1, i] + fx * table[j + 1, i + 1]))

    x0, y0, x1, y1 = (boxes[:, k].astype(np.float64) for k in range(4))
    area = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    return area / np.maximum((x1 - x0) * (y1 - y0), 1e-12)


def save_image(image: np.ndarray, path: Path) -> None:
    """Write ``image`` atomically as PNG, or JPEG (quality 90) when ``path`` ends in .jpg."""
    from PIL import Image

    from sslkit.sharding.core.writer import encode_image

    with replacing(path) as tmp:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            tmp.write_bytes(encode_image(image, fmt="jpeg", quality=90)[1])
        else:
            Image.fromarray(image).save(tmp, format="PNG", compress_level=1)  # masks can be 4096 px a side


def outline_boxes(overview: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The overview with each box (N, 4) in overview pixels outlined in green."""
    out = overview.copy()
    h, w = out.shape[:2]
    for x0, y0, x1, y1 in np.rint(boxes).astype(int):
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w - 1, x1 - 1), min(h - 1, y1 - 1)
        out[y0:y1 + 1, [x0, x1]] = (0, 170, 0)
        out[[y0, y1], x0:x1 + 1] = (0, 170, 0)
    return out
