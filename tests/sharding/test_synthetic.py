"""The synthetic demo generator: shapes, determinism, balance, colour, and difficulty."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_mutual_info_score
from sklearn.preprocessing import StandardScaler

from sslkit.sharding.core.verify import verify_shards
from sslkit.sharding.synthetic import CLASSES, make_synthetic, render_batch, render_crop, sample_rng

_H = np.array([0.5626, 0.7201, 0.4062])
_E = np.array([0.2159, 0.8012, 0.5581])
_UNMIX = np.linalg.pinv(np.stack([_H, _E, np.cross(_H, _E)]).T)  # OD (3,) -> (H, E, residual)


def _crops(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    parts = [render_batch(range(s, min(s + 256, n)), size=32, seed=seed) for s in range(0, n, 256)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, 64)
    centres = (edges[1:] + edges[:-1]) / 2
    w0, m0 = np.cumsum(hist), np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / w0[-1] - m0) ** 2 / (w0 * (w0[-1] - w0))
    return float(centres[np.nanargmax(between)])


def _morphology(image: np.ndarray) -> np.ndarray:
    """log area, eccentricity, mean and std of hematoxylin of the nucleus nearest the centre."""
    od = -np.log10((image.astype(np.float64) + 1) / 256)
    hema = (od @ _UNMIX.T)[..., 0]
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(hema > _otsu(hema)))
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(4)
    yy, xx = np.indices(mask.shape)
    dist = np.hypot(yy - (mask.shape[0] - 1) / 2, xx - (mask.shape[1] - 1) / 2)
    nearest = ndimage.minimum(dist, labels, index=np.arange(1, n + 1))
    blob = labels == 1 + int(np.argmin(nearest))
    if blob.sum() < 3:
        return np.array([np.log(blob.sum()), 0.0, hema[blob].mean(), 0.0])
    low, high = np.linalg.eigvalsh(np.cov(np.stack([yy[blob], xx[blob]])))
    eccentricity = np.sqrt(1 - low / max(high, 1e-9))
    return np.array([np.log(blob.sum()), eccentricity, hema[blob].mean(), hema[blob].std()])


def _kmeans_ami(features: np.ndarray, labels: np.ndarray) -> float:
    pred = KMeans(n_clusters=len(CLASSES), n_init=5, random_state=0).fit_predict(features)
    return adjusted_mutual_info_score(labels, pred)


@pytest.mark.parametrize("size", [32, 48])
def test_render_crop_shape_and_dtype(size: int) -> None:
    crop = render_crop(np.random.default_rng(0), 2, size=size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    assert 20 < crop.std() and crop.min() < 128 < crop.max()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="out of range"):
        render_crop(np.random.default_rng(0), len(CLASSES), size=32)
    with pytest.raises(ValueError, match="size"):
        render_crop(np.random.default_rng(0), 0, size=8)
    with pytest.raises(ValueError, match="num_samples"):
        make_synthetic(tmp_path, num_samples=0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        make_synthetic(tmp_path, num_samples=4, seed=-1, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    assert render_batch([], size=32, seed=0)[0].shape == (0, 32, 32, 3)


def test_crops_do_not_depend_on_chunking() -> None:
    whole, labels = render_batch(range(10), size=32, seed=3)
    parts = [render_batch(r, size=32, seed=3)[0] for r in (range(0, 3), range(3, 4), range(4, 10))]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    np.testing.assert_array_equal(labels, np.arange(10) % len(CLASSES))
    np.testing.assert_array_equal(whole[7], render_crop(sample_rng(3, 7), 7 % len(CLASSES), size=32))


def test_make_synthetic_is_deterministic(tmp_path: Path) -> None:
    runs = {name: make_synthetic(tmp_path / name, num_samples=90, shard_size=40, seed=seed, progress=False)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    hashes = {name: [s["sha256"] for s in m["shards"]] for name, m in runs.items()}
    assert len(hashes["a"]) == 3
    assert hashes["a"] == hashes["b"]
    assert all(x != y for x, y in zip(hashes["a"], hashes["c"]))
    assert verify_shards(tmp_path / "a")["ok"]


def test_shards_are_balanced_and_labelled(tmp_path: Path) -> None:
    manifest = make_synthetic(tmp_path, num_samples=48, shard_size=20, progress=False, prefix="demo")
    assert manifest["num_samples"] == 48 and list(manifest["classes"]) == CLASSES
    assert manifest["classes"] == {name: 12 for name in CLASSES}
    assert manifest["image"] == {"height": 32, "width": 32, "channels": 3, "format": "png"}
    assert manifest["params"]["seed"] == 0 and manifest["params"]["size"] == 32
    with tarfile.open(tmp_path / "demo-000001.tar") as tar:
        meta = json.loads(tar.extractfile("demo-0000021.json").read())
        label = int(tar.extractfile("demo-0000021.cls").read())
    assert meta == {"index": 21, "class": CLASSES[21 % 4]} and label == 21 % 4


def test_colours_are_hematoxylin_and_eosin() -> None:
    crops, _ = _crops(256)
    pixels = crops.reshape(-1, 3).astype(np.float64)
    brightness = pixels.sum(1)
    background = pixels[brightness > np.quantile(brightness, 0.5)].mean(0)
    nuclei = pixels[brightness < np.quantile(brightness, 0.05)].mean(0)
    assert background[0] > background[1] and background[2] > background[1]  # pink: red and blue over green
    assert nuclei[2] > nuclei[0] > nuclei[1] and nuclei.sum() < 0.6 * background.sum()  # dark purple-blue


def test_raw_pixels_cluster_badly_but_morphology_well() -> None:
    crops, labels = _crops(2000)
    raw = _kmeans_ami(crops.reshape(len(crops), -1).astype(np.float32), labels)
    morphology = StandardScaler().fit_transform(np.stack([_morphology(c) for c in crops]))
    shape = _kmeans_ami(morphology, labels)
    assert raw < 0.30, f"raw-pixel k-means AMI {raw:.3f} should stay below 0.30"
    assert shape > raw + 0.3, f"morphology AMI {shape:.3f} should beat raw pixels {raw:.3f} by 0.3"
