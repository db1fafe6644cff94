"""--stain-normalize macenko: images take the reference's stain vectors; what cannot be estimated
is kept and counted; the settings are recorded; mistakes are one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

from sslkit.cli import main
from sslkit.errors import ConfigError
from sslkit.sharding.core.stain import StainNormalizer

REFERENCE_VECTORS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # H, E (Ruifrok & Johnston)
OTHER_LAB = np.array([[0.35, 0.80, 0.48], [0.30, 0.85, 0.43]])  # a bluer haematoxylin, a duller eosin


def he_image(vectors: np.ndarray, *, seed: int = 0, side: int = 96) -> np.ndarray:
    """(side, side, 3) uint8 made by Beer-Lambert from H and E amounts: round nuclei rich in H on an
    eosin-stained stroma, with some glass; ``vectors`` (2, 3) are the two stains' optical densities."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    h = np.full((side, side), 0.1)
    for _ in range(side // 6):
        cy, cx, r = rng.uniform(0, side, 2).tolist() + [rng.uniform(4, 8)]
        h[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = rng.uniform(0.8, 1.4)
    e = rng.uniform(0.3, 0.7, (side, side))
    glass = (xx > side * 0.85)
    h[glass], e[glass] = 0.0, 0.02
    od = h[..., None] * vectors[0] / np.linalg.norm(vectors[0]) + e[..., None] * vectors[1] / np.linalg.norm(vectors[1])
    return np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)


def _vectors(image: np.ndarray) -> np.ndarray:
    """The H and E vectors torchstain's Macenko estimate finds in ``image`` (2, 3), unit length."""
    fitted = NumpyMacenkoNormalizer()
    fitted.fit(image)
    return (fitted.HERef / np.linalg.norm(fitted.HERef, axis=0)).T


@pytest.fixture()
def reference(tmp_path) -> Path:
    path = tmp_path / "reference.png"
    Image.fromarray(he_image(REFERENCE_VECTORS, seed=1)).save(path)
    return path


def test_an_image_from_another_lab_takes_the_reference_stains(reference):
    normaliser = StainNormalizer(reference)
    other = he_image(OTHER_LAB, seed=2)
    before = _vectors(other)
    out, normalised = normaliser(other)
    assert normalised and out.shape == other.shape and out.dtype == np.uint8
    target, after = _vectors(np.asarray(Image.open(reference))), _vectors(out)
    cosine = lambda a, b: float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert min(cosine(after[i], target[i]) for i in range(2)) > 0.995
    assert max(cosine(before[i], target[i]) for i in range(2)) < 0.98  # it really was stained otherwise


def test_what_cannot_be_estimated_is_kept(reference):
    normaliser = StainNormalizer(reference)
    for image in (np.full((64, 64, 3), 235, np.uint8),  # glass
                  np.zeros((64, 64), np.uint8)):  # not RGB
        out, normalised = normaliser(image)
        assert not normalised and out is image


def test_reference_and_flag_mistakes(tmp_path, reference, capsys):
    Image.fromarray(np.full((64, 64, 3), 240, np.uint8)).save(tmp_path / "glass.png")
    with pytest.raises(ConfigError, match="shows too little stained tissue"):
        StainNormalizer(tmp_path / "glass.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StainNormalizer(tmp_path / "none.png")
    (tmp_path / "in" / "a").mkdir(parents=True)
    Image.fromarray(he_image(OTHER_LAB)).save(tmp_path / "in" / "a" / "x.png")
    base = ["shard", "folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "16", "--workers", "0"]
    for extra, message in ((["--stain-normalize", "macenko"], "needs --stain-reference"),
                           (["--stain-reference", str(reference)], "--stain-reference needs --stain-normalize"),
                           (["--stain-normalize", "macenko", "--stain-reference", str(reference), "--channels", "1"],
                            "works on RGB images")):
        with pytest.raises(SystemExit) as stop:
            main([*base, *extra])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_cells_are_cut_from_normalised_tiles_and_the_manifest_records_it(tmp_path, reference):
    root = tmp_path / "tiles"
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    inst = np.zeros((96, 96), np.int32)
    inst[20:30, 20:30], inst[50:62, 40:52] = 1, 2
    images = {"stained": he_image(OTHER_LAB, seed=3), "glass": np.full((96, 96, 3), 236, np.uint8)}
    for name, image in images.items():
        Image.fromarray(image).save(root / "Images" / f"{name}.png")
        sio.savemat(root / "Labels" / f"{name}.mat", {"inst_map": inst, "inst_type": np.array([[1], [2]])})
    main(["shard", "cells", "--format", "consep", "--input", str(root), "--out", str(tmp_path / "out"), "--size", "16",
          "--window", "16", "--workers", "0", "--no-progress", "--stain-normalize", "macenko",
          "--stain-reference", str(reference)])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["params"]["stain_normalize"] == "macenko"
    assert len(manifest["params"]["stain_reference_sha256"]) == 64
    assert {Path(s["path"]).stem: s["stain_kept"] for s in manifest["sources"]} == {"glass": 1, "stained": 0}
    assert manifest["num_samples"] == 4


def test_folder_and_slide_tiles_record_what_was_normalised(tmp_path, reference):
    (tmp_path / "in" / "a").mkdir(parents=True)
    Image.fromarray(he_image(OTHER_LAB, seed=4)).save(tmp_path / "in" / "a" / "tissue.png")
    Image.fromarray(np.full((40, 40, 3), 238, np.uint8)).save(tmp_path / "in" / "a" / "glass.png")
    main(["shard", "folder", str(tmp_path / "in"), "--out", str(tmp_path / "folder"), "--size", "16", "--workers", "0",
          "--no-progress", "--min-class-count", "1", "--stain-normalize", "macenko", "--stain-reference",
          str(reference)])
    manifest = json.loads((tmp_path / "folder" / "manifest.json").read_text())
    assert manifest["sources"][0]["stain_kept"] == 1 and manifest["params"]["stain_normalize"] == "macenko"
    pytest.importorskip("openslide")
    import tifffile

    slide = np.full((512, 512, 3), 245, np.uint8)
    slide[64:448, 64:448] = np.tile(he_image(OTHER_LAB, seed=5, side=96), (4, 4, 1))
    (tmp_path / "slides").mkdir()
    with tifffile.TiffWriter(tmp_path / "slides" / "s.tif") as tif:
        for i, k in enumerate((1, 4)):
            tif.write(slide[::k, ::k], tile=(128, 128), photometric="rgb", compression="zlib",
                      subfiletype=1 if i else 0, resolution=(1e4 / (0.5 * k),) * 2, resolutionunit="CENTIMETER",
                      metadata=None)
    main(["shard", "wsi", str(tmp_path / "slides"), "--out", str(tmp_path / "wsi"), "--mpp", "0.5", "--tile", "128",
          "--workers", "0", "--no-progress", "--stain-normalize", "macenko", "--stain-reference", str(reference)])
    manifest = json.loads((tmp_path / "wsi" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0 and manifest["sources"][0]["stain_kept"] == 0
    assert manifest["params"]["stain_reference"] == str(reference.resolve())
