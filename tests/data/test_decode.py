"""Worker decoding for the tensor back-end: the shortcut past the decode transform gives its pixels, or steps aside."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sslkit.data.augment import build_decode_transform
from sslkit.data.tarread import Decode, Skips, _pil_uint8

SIZE = 16


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _rgb(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _reference(data: bytes, channels: int) -> torch.Tensor:
    """The PIL path the fast path must agree with."""
    return build_decode_transform(size=SIZE, channels=channels)(Image.open(io.BytesIO(data)))


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_shortcut_gives_the_transform_pixels(mode: str, channels: int) -> None:
    data = _encode(_rgb(0).convert(mode))
    fast = _pil_uint8(_open(data), size=SIZE, channels=channels)
    assert fast is not None and fast.dtype == torch.uint8 and fast.shape == (channels, SIZE, SIZE)
    assert torch.equal(fast, _reference(data, channels))


@pytest.mark.parametrize("case", ["palette", "rgba", "gray_alpha", "gray16", "other_size", "gray_for_rgb",
                                  "rgb_for_gray"])
def test_shortcut_steps_aside(case: str) -> None:
    # anything the transform would convert or resize goes through the transform
    image, channels = _rgb(1), 3
    if case == "palette":
        image = image.convert("P")
    elif case == "rgba":
        image = image.convert("RGBA")
    elif case == "gray_alpha":
        image, channels = image.convert("LA"), 1
    elif case == "gray16":
        image, channels = image.convert("I;16"), 1
    elif case == "other_size":
        image = _rgb(1, size=SIZE + 8)
    elif case == "gray_for_rgb":
        image = image.convert("L")
    elif case == "rgb_for_gray":
        channels = 1
    assert _pil_uint8(_open(_encode(image)), size=SIZE, channels=channels) is None


def test_decode_stage_matches_pil_for_every_kind_of_image() -> None:
    # shortcut (RGB PNG, RGB JPEG), then the transform: resized PNG, palette PNG, RGBA PNG, grayscale PNG
    # (converted to RGB); then a PNG whose pixel data is zeroed: counted as corrupt, not raised or crashed
    images = [_encode(_rgb(2)), _encode(_rgb(3, size=SIZE + 8)), _encode(_rgb(4).convert("P")),
              _encode(_rgb(5).convert("RGBA")), _encode(_rgb(6), "JPEG"), _encode(_rgb(7).convert("L"))]
    broken = _encode(_rgb(8))
    broken = broken[:60] + bytes(len(broken) - 60)  # header intact, image data zeroed
    samples = [{"__key__": f"k{i}", "__url__": "shard.tar", "png": data, "cls": b"1"}
               for i, data in enumerate(images + [broken])]
    skips = Skips()
    out = list(Decode(label_key="cls", skips=skips, uint8=(SIZE, 3))(iter(samples)))
    assert [s["id"] for s in out] == [f"k{i}" for i in range(len(images))]
    assert skips.take() == 1
    for sample, data in zip(out, images):
        assert sample["label"] == 1 and sample["image"].shape == (3, SIZE, SIZE)
        assert torch.equal(sample["image"], _reference(data, 3))


def test_decode_stage_keeps_pil_images_without_uint8() -> None:
    # the PIL back-end (views in the workers) still gets PIL images
    out = list(Decode(label_key="cls", skips=Skips())(iter([{"__key__": "a", "png": _encode(_rgb(9))}])))
    assert isinstance(out[0]["image"], Image.Image) and out[0]["label"] == -1
