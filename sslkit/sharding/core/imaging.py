"""Pixels in, pixels out: reading image files of any common kind as uint8 arrays, resizing.

Real collections mix modes: RGBA PNGs, 16-bit TIFFs, palette GIFs, grayscale JPEGs,
CMYK scans. Everything is brought to (H, W, 3) RGB or (H, W) grayscale uint8 here,
once, so writers and crop code see one kind of array.

    image = read_image("a.tiff", channels=1)        # (H, W) uint8
    small = resize(image, (32, 32))                  # area-averaging when shrinking
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pnm")
Image.MAX_IMAGE_PIXELS = None  # tiles and crops, not decompression bombs: slides are read elsewhere


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Integer or float pixels as uint8: 16-bit scaled by 1/257, floats in [0, 1] or [0, 255] clipped."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype.itemsize >= 2 and array.max(initial=0) > 255:
            return np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
        return np.clip(array, 0, 255).astype(np.uint8)
    scale = 255.0 if np.nanmax(array, initial=0) <= 1.0 else 1.0
    return np.clip(np.rint(np.nan_to_num(array) * scale), 0, 255).astype(np.uint8)


def to_channels(image: np.ndarray, channels: int, *, background: int = 255) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W) for 1 channel, (H, W, 3) for 3.

    Alpha is composited over ``background`` (white by default: slides and karyograms
    have white backgrounds); RGB -> gray uses ITU-R 601 luma like PIL's "L".
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    image = to_uint8(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (2, 4) and image[:, :, -1].min() == 255:  # opaque: drop alpha
        image = np.ascontiguousarray(image[:, :, :-1] if image.shape[2] == 4 else image[:, :, 0])
    if image.ndim == 3 and image.shape[2] in (2, 4):  # gray+alpha or RGBA
        alpha = image[:, :, -1:].astype(np.float32) / 255.0
        color = image[:, :, :-1].astype(np.float32)
        image = np.rint(color * alpha + background * (1.0 - alpha)).astype(np.uint8)
        if image.shape[2] == 1:
            image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] != 3:
        raise ValueError(f"Cannot interpret an image of shape {image.shape} as gray or RGB.")
    if channels == 3:
        return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
    if image.ndim == 2:
        return image
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def read_image(path: str | Path, *, channels: int = 3, background: int = 255) -> np.ndarray:
    """Decode an image file (PNG, JPEG, TIFF incl. 16-bit, BMP, GIF, WebP) to uint8, 1 or 3 channels.

    Raises OSError (or PIL's UnidentifiedImageError, a subclass) when the file does not decode.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
            img = img.convert("RGBA" if img.mode in ("P", "PA") else "RGB")
        array = np.asarray(img)
    return to_channels(array, channels, background=background)


def resize(image: np.ndarray, size: tuple[int, int], *, box: tuple[float, float, float, float] | None = None,
           area: bool = False) -> np.ndarray:
    """``image`` (H, W[, 3]) uint8 resized to ``size`` = (height, width).

    Bilinear with area-averaging when shrinking (PIL's ``reducing_gap``-free BILINEAR is
    box-filtered by its support), so small nuclei do not alias; unchanged when equal.
    ``box`` = (left, top, right, bottom), fractional source pixels: resample only that
    part of ``image``; pixels around it feed the filter, so pieces cut from one large
    image with a margin match resizing it whole. ``area``: plain area averages (PIL's BOX)
    instead, so each output pixel is the mean of exactly the input area it covers.
    """
    height, width = size
    if box is None and image.shape[:2] == (height, width):
        return image
    resample = Image.Resampling.BOX if area else Image.Resampling.BILINEAR
    out = Image.fromarray(image).resize((width, height), resample, box=box)
    return np.asarray(out)


def border_value(image: np.ndarray) -> int | tuple[int, ...]:
    """Median of the outermost rows and columns of (H, W) or (H, W, C) uint8: the background.

    One value for grayscale, one per channel otherwise (rounded half to even). Works for
    white-background karyograms and black-background fluorescence alike.
    """
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"Cannot take the border of an empty image of shape {image.shape}.")
    if h <= 2 or w <= 2:
        border = image.reshape(h * w, *image.shape[2:])
    else:
        border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])  # (2W + 2H - 4[, C])
    median = np.rint(np.median(border, axis=0)).astype(np.int64)
    return int(median) if median.ndim == 0 else tuple(int(v) for v in median)


def centre_on(image: np.ndarray, shape: tuple[int, ...], value: int | tuple[int, ...]) -> np.ndarray:
    """``image`` centred on a canvas of ``shape`` filled with ``value``: padded, or cropped where larger
    (extra pixels go bottom/right)."""
    if image.shape == tuple(shape):
        return image
    out = np.empty(tuple(shape), dtype=image.dtype)
    out[...] = value
    h, w = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
    oy, ox, iy, ix = (shape[0] - h) // 2, (shape[1] - w) // 2, (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    out[oy:oy + h, ox:ox + w] = image[iy:iy + h, ix:ix + w]
    return out


def pad_to_square(image: np.ndarray, value: int | tuple[int, ...]) -> np.ndarray:
    """(H, W[, C]) -> (S, S[, C]), S = max(H, W), the image centred on ``value`` (extra pixel bottom/right)."""
    side = max(image.shape[:2])
    return centre_on(image, (side, side, *image.shape[2:]), value)


__all__ = ["IMAGE_EXTENSIONS", "read_image", "to_uint8", "to_channels", "resize", "border_value", "centre_on",
           "pad_to_square"]
