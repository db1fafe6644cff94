"""Stain normalisation of H&E images to a reference, an option of the importers
(``--stain-normalize macenko --stain-reference IMG``): Macenko et al. (2009), as torchstain's
NumPy implementation computes it.

The reference image fixes the target stain vectors and concentrations. Each image (a slide
tile, a whole annotated tile before its nuclei are cut, a folder image) is normalised on its
own. Where the estimate cannot be made -- too little stained tissue (background, a blank
tile), a pen mark that leaves one colour, a degenerate fit -- the image is kept as it was and
counted: the manifest's ``sources`` entry of its input says how many (``stain_kept``), and
its ``params`` name the method and the reference (path and sha256).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from sslkit.errors import ConfigError, MissingInput, UsageError

METHODS = ("none", "macenko")
_IO, _BETA = 240, 0.15  # transmitted light and the optical density below which a pixel is background
MIN_TISSUE = 0.05  # share of pixels with stain in every channel that an image needs for its own estimate


def _tissue_share(image: np.ndarray) -> float:
    od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / _IO)
    return float(np.mean(np.all(od >= _BETA, axis=1)))


class StainNormalizer:
    """``(image, normalised)`` of an (H, W, 3) uint8 image: Macenko-normalised to the reference, or the
    image unchanged (``False``) where its own stain estimate cannot be made."""

    def __init__(self, reference: str | Path) -> None:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        from sslkit.sharding.core.imaging import read_image

        path = Path(reference)
        if not path.is_file():
            raise MissingInput(f"Stain reference {reference} does not exist; give an H&E image to normalise to.")
        try:
            image = read_image(str(path), channels=3)
        except Exception as err:  # noqa: BLE001 -- any decoder error is the user's file
            raise ConfigError(f"Stain reference {reference} does not decode as an image ({err}).") from None
        self._macenko = NumpyMacenkoNormalizer()
        if _tissue_share(image) < MIN_TISSUE or not self._fit(image):
            raise ConfigError(f"Stain reference {reference} shows too little stained tissue for Macenko's estimate "
                              f"(under {MIN_TISSUE:.0%} of its pixels); give a tile full of H&E tissue.")
        self.params = {"stain_normalize": "macenko", "stain_reference": str(path.resolve()),
                       "stain_reference_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    def _fit(self, image: np.ndarray) -> bool:
        try:
            with np.errstate(divide="raise", over="raise", invalid="raise", under="ignore"):
                self._macenko.fit(image, Io=_IO, beta=_BETA)
        except (np.linalg.LinAlgError, ValueError, IndexError, FloatingPointError):
            return False
        return bool(np.all(np.isfinite(self._macenko.HERef)) and np.all(self._macenko.maxCRef > 0))

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        if image.ndim != 3 or image.shape[2] != 3 or _tissue_share(image) < MIN_TISSUE:
            return image, False
        try:
            with np.errstate(divide="raise", over="raise", invalid="raise", under="ignore"):
                out, _, _ = self._macenko.normalize(image, Io=_IO, beta=_BETA, stains=False)
        except (np.linalg.LinAlgError, ValueError, IndexError, FloatingPointError):
            return image, False
        return out, True


def add_stain_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stain normalisation (H&E, RGB)")
    group.add_argument("--stain-normalize", choices=METHODS, default="none",
                       help="normalise each image's stains to --stain-reference (Macenko); images where the "
                            "estimate fails are kept as they are and counted (default none)")
    group.add_argument("--stain-reference", help="the H&E image whose staining the others take")


def stain_from_args(args: argparse.Namespace, *, channels: int = 3) -> Optional[StainNormalizer]:
    """The normaliser the flags ask for, or None; a flag without the other is a UsageError."""
    if args.stain_normalize == "none":
        if args.stain_reference:
            raise UsageError("--stain-reference needs --stain-normalize macenko; add it or drop the reference.")
        return None
    if not args.stain_reference:
        raise UsageError("--stain-normalize macenko needs --stain-reference IMG, the image to normalise to.")
    if channels != 3:
        raise UsageError("--stain-normalize works on RGB images; drop it or use --channels 3.")
    return StainNormalizer(args.stain_reference)


__all__ = ["METHODS", "StainNormalizer", "add_stain_args", "stain_from_args"]
