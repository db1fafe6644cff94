"""The demo data: procedural H&E-like nucleus crops in four classes, written as shards.

Classes differ the way real nuclei do, in features that survive colour jitter,
grayscale, blur, flips and rotation:

    epithelial    large, round-oval, vesicular: pale chromatin, dark rim, 1-2 nucleoli
    inflammatory  small, round, dense and dark (lymphocyte-like)
    spindle       elongated (aspect 3-5), tapered, slightly bent, evenly stained
    misc          large, lobulated outline, dark coarse clumped chromatin (pleomorphic)

Everything else is nuisance, drawn independently of the class: stain vectors and
concentrations (per image), eosin stroma with wavy fibres and white gaps, partial
neighbouring nuclei of random classes, the centre nucleus' offset and rotation, blur
and noise. Colour comes from Beer-Lambert mixing of hematoxylin and eosin optical
densities, ``I = I0 * 10 ** -(c_H * h + c_E * e)``.

Difficulty (checked in tests/sharding/test_synthetic.py): k-means on raw pixels
finds almost nothing (AMI ~0.02 on 4,000 crops), while k-means on four hand-made
features of the centre nucleus (area, eccentricity, mean and spread of hematoxylin)
reaches AMI ~0.6, so a good augmentation-invariant encoder has room to show.

Crop ``i`` draws all its random numbers (in a fixed order) from
``SeedSequence(seed, spawn_key=(i,))``; rendering is then vectorised over a batch
and treats every crop independently, so crops do not depend on chunking and the
same seed gives byte-identical shards::

    manifest = make_synthetic("shards/demo/train", num_samples=4000, seed=0)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from sslkit.sharding.core.source import Progress, Sample, Unit
from sslkit.sharding.core.writer import ShardSetWriter

CLASSES = ["epithelial", "inflammatory", "spindle", "misc"]
GENERATOR_VERSION = 1
_K = 4  # nuclei per crop: the centre one + 3 slots for partial neighbours
_H_REF = np.array([0.5626, 0.7201, 0.4062])  # hematoxylin OD per unit concentration (RGB)
_E_REF = np.array([0.2159, 0.8012, 0.5581])  # eosin
_BLUR_LEVELS = (0.0, 0.5, 0.8, 1.1)  # px at size 32; one level per image
_FIELD_SIGMAS = (0.6, 1.3, 4.0, 3.0)  # px at size 32: fine chromatin, coarse chromatin, fibre warp, gaps

# Per-class ranges (lo, hi), lengths in px at size 32. major: semi-major axis;
# aspect: major/minor; taper: narrowing towards the poles (0 = ellipse); bend: curvature;
# lobes: outline harmonic amplitude; density: hematoxylin inside; rim: extra hematoxylin
# along the membrane; nucleoli: count (rounded); fine/coarse: chromatin texture
# amplitudes; halo: cytoplasm eosin (the same range for every class on purpose: colour
# around the nucleus must not give the class away).
_MORPH = {
    "epithelial": dict(major=(6.8, 8.2), aspect=(1.1, 1.4), taper=(0, 0), bend=(0, 0), lobes=(0.02, 0.06),
                       density=(0.25, 0.38), rim=(0.6, 0.9), nucleoli=(1, 2), fine=(0.25, 0.35),
                       coarse=(0.05, 0.1), halo=(0.05, 0.3)),
    "inflammatory": dict(major=(2.8, 3.6), aspect=(1.0, 1.12), taper=(0, 0), bend=(0, 0), lobes=(0.01, 0.04),
                         density=(1.2, 1.5), rim=(0, 0.1), nucleoli=(0, 0), fine=(0.08, 0.12),
                         coarse=(0.1, 0.15), halo=(0.05, 0.3)),
    "spindle": dict(major=(8.0, 10.5), aspect=(3.2, 5.0), taper=(0.3, 0.5), bend=(-0.03, 0.03),
                    lobes=(0, 0.03), density=(0.75, 0.95), rim=(0, 0.1), nucleoli=(0, 0), fine=(0.05, 0.1),
                    coarse=(0.02, 0.05), halo=(0.05, 0.3)),
    "misc": dict(major=(6.0, 7.2), aspect=(1.05, 1.3), taper=(0, 0), bend=(0, 0), lobes=(0.15, 0.25),
                 density=(0.75, 0.95), rim=(0.1, 0.3), nucleoli=(0, 0), fine=(0.1, 0.15),
                 coarse=(0.4, 0.55), halo=(0.05, 0.3)),
}
_RANGED = tuple(_MORPH["misc"])  # class-dependent columns of the per-nucleus uniforms
_LO = np.array([[_MORPH[c][k][0] for k in _RANGED] for c in CLASSES], dtype=np.float32)
_HI = np.array([[_MORPH[c][k][1] for k in _RANGED] for c in CLASSES], dtype=np.float32)
# Class-free per-nucleus columns follow the ranged ones: angle, 3 harmonic weights,
# 3 harmonic phases, 2 nucleoli (u, v) positions, 2 nucleoli strengths.
_NUC_COLS = len(_RANGED) + 13
# Per-image columns: 0-1 centre offset, 2-4 neighbour presence, 5-14 neighbour placement
# (_place_nuclei), 15-25 stain and stroma, 26 blur, 27 noise (_image_params).
_IMG_COLS = 28


def _draw(rng: np.random.Generator, label: int, canvas: int, size: int) -> dict[str, np.ndarray]:
    """All random numbers of one crop, in a fixed order and fixed shapes."""
    neighbours = rng.integers(0, len(CLASSES), size=_K - 1)
    return {
        "labels": np.concatenate([[label], neighbours]),
        "u_nuc": rng.random((_K, _NUC_COLS), dtype=np.float32),
        "u_img": rng.random(_IMG_COLS, dtype=np.float32),
        "stain": rng.standard_normal(9, dtype=np.float32),
        # Centred uniform noise with unit variance: smoothing makes it Gaussian, and it is
        # several times cheaper to draw than normals.
        "fields": _unit_uniform(rng, (len(_FIELD_SIGMAS), canvas, canvas)),
        "pixel_noise": _unit_uniform(rng, (size, size, 3)),
    }


def _unit_uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(np.sqrt(12))


def _span(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.float32(lo) + np.float32(hi - lo) * u


def _nucleus_params(raw: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """(B, K) shape/stain parameters of every nucleus (lengths in px at this size)."""
    labels, u = raw["labels"], raw["u_nuc"]
    r = len(_RANGED)
    ranged = _LO[labels] + (_HI[labels] - _LO[labels]) * u[..., :r]  # (B, K, r)
    p = {k: ranged[..., j] for j, k in enumerate(_RANGED)}
    p["major"] = p["major"] * scale
    p["minor"] = p["major"] / p["aspect"]
    p["bend"] = p["bend"] / scale
    p["angle"] = _span(u[..., r], 0, 2 * np.pi)
    weights = u[..., r + 1:r + 4] + 0.05
    harm = 1.7 * p["lobes"][..., None] * weights / weights.sum(-1, keepdims=True)  # (B, K, 3)
    phase = _span(u[..., r + 4:r + 7], 0, 2 * np.pi)
    p["harm_cos"], p["harm_sin"] = harm * np.cos(phase), harm * np.sin(phase)
    p["nuc_pos"] = _span(u[..., r + 7:r + 11], -0.45, 0.45)  # (B, K, 4): (u, v) x 2, in (major, minor)
    count = np.rint(p["nucleoli"])[..., None]  # (B, K, 1): 0, or 1-2 for epithelial
    p["nuc_amp"] = (np.arange(2) < count) * _span(u[..., r + 11:r + 13], 0.6, 0.9)
    return p


def _place_nuclei(p: dict[str, np.ndarray], ui: np.ndarray, scale: float) -> None:
    """Centres (B, K): the centre nucleus near the middle, neighbours just outside it."""
    radius, theta = np.float32(5.0 * scale) * np.sqrt(ui[:, 0]), _span(ui[:, 1], 0, 2 * np.pi)
    cx, cy = radius * np.cos(theta), radius * np.sin(theta)  # (B,)
    present = np.concatenate([np.ones_like(ui[:, :1]), ui[:, 2:5] < 0.4], axis=1)
    spokes = np.arange(_K - 1, dtype=np.float32) * np.float32(2 * np.pi / (_K - 1))  # spread around
    angle = _span(ui[:, 5:6], 0, 2 * np.pi) + spokes
    angle = angle + _span(ui[:, 6:9], -0.6, 0.6)
    dist = np.maximum(p["major"][:, :1] + 0.6 * p["major"][:, 1:] + _span(ui[:, 9:12], 1, 4) * scale,
                      _span(ui[:, 12:15], 13.5, 18) * scale)  # (B, K-1)
    p["cx"] = np.concatenate([cx[:, None], cx[:, None] + dist * np.cos(angle)], axis=1)
    p["cy"] = np.concatenate([cy[:, None], cy[:, None] + dist * np.sin(angle)], axis=1)
    p["present"] = present.astype(np.float32)


def _image_params(raw: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """(B,) stain, stroma, blur and noise settings of every crop."""
    ui, n = raw["u_img"], raw["stain"]
    stain = np.stack([_H_REF, _E_REF]).astype(np.float32) + 0.04 * n[:, :6].reshape(-1, 2, 3)
    names = ("h_scale", "e_scale", "i0", "bg_h", "bg_e", "fibre_angle", "fibre_freq", "fibre_phase",
             "fibre_contrast", "warp", "gap")
    ranges = ((0.7, 1.35), (0.8, 1.2), (200, 250), (0.02, 0.1), (0.25, 0.4), (0, np.pi),
              (0.3, 0.9), (0, 2 * np.pi), (0.15, 0.6), (1.0, 3.0), (-0.2, 1.2))
    p = {k: _span(ui[:, 15 + j], *rng_) for j, (k, rng_) in enumerate(zip(names, ranges))}
    p["stain"] = stain / np.linalg.norm(stain, axis=2, keepdims=True)  # (B, 2, 3)
    p["i0"] = np.clip(p["i0"][:, None] + 5 * n[:, 6:9], 0, 255)  # (B, 3)
    p["fibre_freq"] = p["fibre_freq"] / scale
    p["blur"] = np.minimum(ui[:, 26] * len(_BLUR_LEVELS), len(_BLUR_LEVELS) - 1).astype(int)
    p["noise"] = _span(ui[:, 27], 1.5, 5.0)
    return p


def _smooth_fields(fields: np.ndarray, scale: float) -> np.ndarray:
    """(B, F, S, S) white noise -> each field smoothed by its own sigma, ~unit variance."""
    out = np.empty_like(fields)
    for f, sigma in enumerate(_FIELD_SIGMAS):
        s = sigma * scale
        out[:, f] = gaussian_filter(fields[:, f], sigma=(0, s, s), mode="wrap", truncate=3.0)
        out[:, f] *= np.float32(2 * np.sqrt(np.pi) * s)
    return out


def _outline(c: np.ndarray, s: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Radius factor 1 + sum_k a_k cos(k psi + phi_k), k = 2..4, from c = cos psi, s = sin psi."""
    c2, s2 = c * c - s * s, 2 * c * s
    c3, s3 = c * c2 - s * s2, s * c2 + c * s2
    c4, s4 = c2 * c2 - s2 * s2, 2 * c2 * s2
    hc, hs = p["harm_cos"][..., None, None], p["harm_sin"][..., None, None]  # (B, K, 3, 1, 1)
    return 1 + hc[:, :, 0] * c2 - hs[:, :, 0] * s2 + hc[:, :, 1] * c3 - hs[:, :, 1] * s3 + \
        hc[:, :, 2] * c4 - hs[:, :, 2] * s4


def _windows(p: dict[str, np.ndarray], canvas: int, width: int) -> tuple[np.ndarray, ...]:
    """Each nucleus is drawn in a (width, width) window around its centre pixel.

    Returns the windows' top rows and left columns on the canvas (B, K) (they may fall
    outside it) and the pixel offsets from the nucleus centres, dy (B, K, W, 1) and
    dx (B, K, 1, W).
    """
    origin = (canvas - 1) / 2
    steps = np.arange(width)
    corner, offset = {}, {}
    for axis in ("cy", "cx"):
        corner[axis] = np.floor(p[axis] + origin + 0.5).astype(np.int64) - width // 2  # (B, K)
        offset[axis] = (corner[axis][..., None] + steps - origin - p[axis][..., None]).astype(np.float32)
    return corner["cy"], corner["cx"], offset["cy"][..., :, None], offset["cx"][..., None, :]


def _margin(top: np.ndarray, left: np.ndarray, width: int, canvas: int) -> int:
    """Padding that holds every window, wherever it sits relative to the canvas."""
    low, high = min(top.min(), left.min()), max(top.max(), left.max()) + width
    return max(0, -int(low), int(high) - canvas)


def _gather(fields: np.ndarray, top: np.ndarray, left: np.ndarray, width: int) -> np.ndarray:
    """(B, S, S, F) periodic fields cut at every window -> (B, K, W, W, F)."""
    pad = _margin(top, left, width, fields.shape[1])
    padded = np.pad(fields, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="wrap")
    out = np.empty(top.shape + (width, width, fields.shape[-1]), dtype=fields.dtype)
    for (b, k), t in np.ndenumerate(top):  # B * K slices: far cheaper than fancy indexing
        out[b, k] = padded[b, t + pad:t + pad + width, left[b, k] + pad:left[b, k] + pad + width]
    return out


def _scatter(windows: np.ndarray, top: np.ndarray, left: np.ndarray, canvas: int) -> np.ndarray:
    """Sum (B, K, W, W, C) windows into (B, S, S, C) canvases at their corners."""
    width = windows.shape[2]
    pad = _margin(top, left, width, canvas)
    full = canvas + 2 * pad  # room for windows that stick out of the canvas
    out = np.zeros((windows.shape[0], full, full, windows.shape[-1]), dtype=np.float32)
    for (b, k), t in np.ndenumerate(top):
        out[b, t + pad:t + pad + width, left[b, k] + pad:left[b, k] + pad + width] += windows[b, k]
    return out[:, pad:pad + canvas, pad:pad + canvas]


def _nuclei(p: dict[str, np.ndarray], fields: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
    """(B, S, S) each: hematoxylin of all nuclei, their footprint, footprint x cytoplasm eosin."""
    canvas = fields.shape[-1]
    width = 2 * int(np.ceil(12 * scale)) + 2
    top, left, dy, dx = _windows(p, canvas, width)
    col = {k: p[k][..., None, None] for k in ("angle", "major", "minor", "taper", "bend", "density",
                                             "rim", "fine", "coarse", "halo", "present")}
    cos, sin = np.cos(col["angle"]), np.sin(col["angle"])
    u = cos * dx + sin * dy  # (B, K, W, W), along the major axis
    v = -sin * dx + cos * dy - col["bend"] * u * u
    a, b = col["major"], col["minor"]
    x = u / a
    y = v / (b * np.maximum(1 - col["taper"] * x * x, 0.15))  # spindles narrow towards the poles
    r = np.sqrt(x * x + y * y) + np.float32(1e-6)
    d = r / _outline(x / r, y / r, p)  # 1 on the border
    sd = (1 - d) * np.sqrt(a * b) * np.float32(0.85)  # ~signed distance to the border in px, inside > 0
    inside = np.clip(0.5 + 1.1 * sd, 0, 1) * col["present"]
    ring = np.maximum(1 - ((sd - 0.9) / 1.1) ** 2, 0) ** 2
    texture = _gather(fields[:, :2].transpose(0, 2, 3, 1), top, left, width)  # (B, K, W, W, 2)
    chromatin = col["fine"] * texture[..., 0] + col["coarse"] * texture[..., 1]
    chromatin = col["density"] * np.clip(1 + chromatin, 0.1, None)
    pos, amp = p["nuc_pos"][..., None, None], p["nuc_amp"][..., None, None]
    for j in range(2):  # nucleoli: compact bumps at (u, v) inside the nucleus
        r2 = (u - pos[:, :, 2 * j] * a) ** 2 + (v - pos[:, :, 2 * j + 1] * b) ** 2
        chromatin = chromatin + amp[:, :, j] * np.maximum(1 - r2 / 2.5, 0) ** 2
    hema = inside * (chromatin + col["rim"] * ring)
    out = _scatter(np.stack([hema, inside, inside * col["halo"]], -1), top, left, canvas)
    return out[..., 0], np.minimum(out[..., 1], 1), out[..., 2]


def _stroma(p: dict[str, np.ndarray], fields: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Eosin (B, S, S) of the background: wavy collagen fibres with white gaps."""
    e = {k: p[k][:, None, None] for k in ("fibre_angle", "fibre_freq", "fibre_phase", "fibre_contrast",
                                         "warp", "gap", "bg_e")}
    along = grid[1] * np.cos(e["fibre_angle"]) + grid[0] * np.sin(e["fibre_angle"])
    fibres = 0.5 + 0.5 * np.sin(e["fibre_freq"] * along + e["fibre_phase"] + e["warp"] * fields[:, 2])
    open_space = np.clip(0.5 + 1.5 * (fields[:, 3] - e["gap"]), 0, 1)
    return e["bg_e"] * (1 - e["fibre_contrast"] * fibres) * (1 - 0.85 * open_space)


def _render(raw: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Batched rendering: stacked raw draws -> (B, size, size, 3) uint8."""
    scale = size / 32
    canvas = raw["fields"].shape[-1]
    p = _nucleus_params(raw, scale)
    _place_nuclei(p, raw["u_img"], scale)
    p.update(_image_params(raw, scale))
    coords = (np.arange(canvas) - (canvas - 1) / 2).astype(np.float32)
    grid = np.stack(np.meshgrid(coords, coords, indexing="ij"))  # (2, S, S): y, x
    fields = _smooth_fields(raw["fields"], scale)
    hema, footprint, halo = _nuclei(p, fields, scale)
    hema = hema + p["bg_h"][:, None, None] * (1 + 0.5 * fields[:, 0])
    cyto = gaussian_filter(halo, sigma=(0, 2.5 * scale, 2.5 * scale), mode="constant")
    cyto = np.minimum(2.0 * cyto, 0.6)  # cytoplasm: a soft pink skirt around each nucleus
    eosin = (_stroma(p, fields, grid) + cyto) * (1 - 0.75 * footprint)  # nuclei take up little eosin
    conc = np.stack([hema * p["h_scale"][:, None, None], eosin * p["e_scale"][:, None, None]], -1)
    od = np.clip(conc, 0, None) @ p["stain"][:, None]  # (B, S, S, 2) @ (B, 1, 2, 3) -> (B, S, S, 3)
    rgb = p["i0"][:, None, None, :] * np.power(np.float32(10), -od)
    for level, sigma in enumerate(_BLUR_LEVELS):
        pick = np.flatnonzero(p["blur"] == level)
        if sigma > 0 and pick.size:
            rgb[pick] = gaussian_filter(rgb[pick], sigma=(0, sigma * scale, sigma * scale, 0))
    margin = (canvas - size) // 2
    rgb = rgb[:, margin:margin + size, margin:margin + size]
    rgb += p["noise"][:, None, None, None] * raw["pixel_noise"]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _canvas(size: int) -> int:
    return size + 2 * max(2, size // 8)


def _check(label: int, size: int) -> None:
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"Label {label} is out of range; use 0..{len(CLASSES) - 1} for {CLASSES}.")
    if size < 16:
        raise ValueError(f"Synthetic crops need size >= 16 pixels, got {size}.")


def _stack(draws: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([d[k] for d in draws]) for k in draws[0]}


def render_crop(rng: np.random.Generator, label: int, *, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 crop of class ``label`` (an index into ``CLASSES``)."""
    _check(label, size)
    return _render(_stack([_draw(rng, label, _canvas(size), size)]), size)[0]


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of crop ``index``: independent of chunking and of other crops."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def render_batch(indices: Iterable[int], *, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops (N, size, size, 3) uint8 and labels (N,) = index % 4 for the given global indices."""
    indices = list(indices)
    labels = np.array([i % len(CLASSES) for i in indices], dtype=np.int64)
    _check(0, size)
    if not indices:
        return np.zeros((0, size, size, 3), dtype=np.uint8), labels
    draws = [_draw(sample_rng(seed, i), int(k), _canvas(size), size) for i, k in zip(indices, labels)]
    return _render(_stack(draws), size), labels


def render_cells(rng: np.random.Generator, classes: np.ndarray, *, size: int, even_stain: bool = True) -> np.ndarray:
    """Crops (N, size, size, 3) uint8 whose nuclei have the given classes: ``classes`` (N, 4) int,
    the centre nucleus then the 3 neighbour slots (a neighbour is present with probability 0.4).

    For tiling a larger field (``sslkit.slides.synthetic``): with ``even_stain`` every crop gets
    the same stain vectors, stain amounts, illumination and focus (the middle of each range), so
    side-by-side crops look like one section; texture, fibres, shapes and noise still vary.
    All random numbers come from ``rng``, crop by crop in a fixed order.
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1, _K)
    _check(int(classes.min(initial=0)), size)
    _check(int(classes.max(initial=0)), size)
    if not len(classes):
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    draws = []
    for row in classes:
        raw = _draw(rng, int(row[0]), _canvas(size), size)
        raw["labels"] = row.copy()
        if even_stain:  # columns as in _image_params: stain normals 0-8, h/e scale and i0 (15-17), blur (26)
            raw["stain"][:] = 0
            raw["u_img"][15:18] = 0.5
            raw["u_img"][26] = 1.5 / len(_BLUR_LEVELS)  # _BLUR_LEVELS[1]
        draws.append(raw)
    return _render(_stack(draws), size)


def samples(indices: range, *, size: int, seed: int, prefix: str) -> Iterator[Sample]:
    """Crops ``indices`` as Samples: key ``{prefix}-{index:07d}``, label index % 4, meta index and class."""
    images, labels = render_batch(indices, size=size, seed=seed)
    for i, image, label in zip(indices, images, labels):
        yield Sample(f"{prefix}-{i:07d}", image, int(label), {"index": i, "class": CLASSES[label]})


def make_synthetic(
    out_dir: str | Path,
    *,
    num_samples: int,
    size: int = 32,
    seed: int = 0,
    shard_size: int = 1000,
    prefix: str = "demo",
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Write ``num_samples`` crops (class = index % 4) as shards; returns the manifest."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    _check(0, size)
    params = {"generator": "sslkit.sharding.synthetic", "generator_version": GENERATOR_VERSION,
              "num_samples": num_samples, "size": size, "seed": seed, "shard_size": shard_size}
    chunk = 256
    with ShardSetWriter(out_dir, prefix=prefix, maxcount=shard_size, classes=CLASSES,
                        params=params, command=command) as writer:
        with tqdm(total=num_samples, desc="synthetic crops", unit="crop", disable=not progress) as bar:
            for start in range(0, num_samples, chunk):
                for sample in samples(range(start, min(start + chunk, num_samples)), size=size, seed=seed,
                                      prefix=prefix):
                    writer.write(sample.key, sample.image, label=sample.label, meta=sample.meta)
                bar.update(min(chunk, num_samples - start))
    return writer.manifest


class SyntheticSource:
    """The demo crops as a ``Source`` for ``sslkit.sharding.core.runner``: units of ``chunk`` consecutive indices.

    Same crops, keys and labels as ``make_synthetic`` (``{prefix}-{index:07d}``, class =
    index % 4), but sharded in parallel, over ranks and resumably.
    """

    kind, classes, encode, quality, handles_skip = "synthetic", CLASSES, "png", 90, False
    unit_noun, sample_noun = "chunk", "crop"

    def __init__(self, *, num_samples: int, size: int = 32, seed: int = 0, chunk: int = 256,
                 prefix: str = "demo") -> None:
        if num_samples <= 0 or chunk <= 0:
            raise ValueError(f"num_samples ({num_samples}) and chunk ({chunk}) must be positive.")
        _check(0, size)
        self.num_samples, self.size, self.seed, self.chunk, self.prefix = num_samples, size, seed, chunk, prefix

    def params(self) -> dict[str, Any]:
        return {"generator_version": GENERATOR_VERSION, "num_samples": self.num_samples, "size": self.size,
                "seed": self.seed, "chunk": self.chunk, "prefix": self.prefix}

    def units(self) -> list[Unit]:
        return [Unit(id=f"{self.prefix}-{start:07d}", path=f"synthetic[{start}:{stop}]", cost=stop - start,
                     payload=(start, stop))
                for start in range(0, self.num_samples, self.chunk)
                for stop in [min(start + self.chunk, self.num_samples)]]

    def produce(self, unit: Unit, *, skip: int, progress: Progress) -> Iterable[Sample]:
        start, stop = unit.payload
        progress.total(stop - start)
        yield from samples(range(start, stop), size=self.size, seed=self.seed, prefix=self.prefix)


def contact_sheet(images: np.ndarray, labels: np.ndarray, classes: list[str], *,
                  per_class: int = 8, zoom: int = 4) -> np.ndarray:
    """(classes * H * zoom, per_class * W * zoom, 3) uint8 grid: one row per class."""
    h, w = images.shape[1:3]
    sheet = np.full((len(classes) * h, per_class * w, 3), 255, dtype=np.uint8)
    for row in range(len(classes)):
        for col, i in enumerate(np.flatnonzero(labels == row)[:per_class]):
            sheet[row * h:(row + 1) * h, col * w:(col + 1) * w] = images[i]
    return sheet.repeat(zoom, 0).repeat(zoom, 1)
