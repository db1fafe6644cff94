"""The two view back-ends draw every random parameter from the same distribution.

``build_views`` (PIL, one image at a time, torchvision v2) and ``BatchViews`` (whole uint8
batches, each sample its own parameters) implement one recipe twice. test_batch_views.py
checks each op against torchvision's; here each random parameter is read back off the views
of a probe image made so that, with every other op off, a view shows that parameter alone:

- crop box (area, aspect, centre): a ramp whose red value is the x coordinate and green the
  y coordinate, so a view's values are the input coordinates it sampled;
- flips and rotation: the same ramp; an affine fit inside the central disc (which no corner
  fill reaches) gives each view's 2x2 map to input coordinates;
- jitter factors: grey or colour ramps from which a regression gives the factor;
- grayscale: the fraction of views with R == G == B;
- blur: a step edge, whose blurred profile gives the kernel's spread and so sigma;
- HED stain jitter (tensor back-end only): a probe of varied stain amounts, from which a
  regression per stain gives the scale and shift a view applied.

Each test draws N views per back-end (PIL: one image at a time, torch's global generator
seeded; tensor: one batch, a seeded ``torch.Generator``), compares the two samples (two-sample
KS for continuous parameters, chi-square for probabilities) and each sample with the analytic
distribution. Seeds are fixed, so every p-value is a fixed number; each must exceed ALPHA.
Negative controls show that the same comparisons reject a changed parameter at this N.

Both back-ends are read on the 8-bit grid: the PIL back-end's views are 8-bit images, so the
tensor back-end's floats are rounded to it before a parameter is read.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sslkit.config import ViewsConfig
from sslkit.data import augment as A

N = 2000  # views per back-end and parameter
ALPHA = 1e-3  # "same distribution": every p-value above this
POWER = 1e-6  # negative controls: every p-value below this, at the same N
PIL_SEED, TENSOR_SEED = 1, 2
SIZE = 32
SOURCE = 256  # the crop probe's full resolution (see test_crop_area_aspect_and_centre_match)
OFF = dict(p_jitter=0.0, p_gray=0.0, p_blur=0.0, rotation=0.0, flips=False, jitter=[0.0, 0.0, 0.0, 0.0])


def _cfg(**fields) -> ViewsConfig:
    """Every random op off except those named; global views unless a recipe is named."""
    return ViewsConfig(**{"recipe": "global_global", **OFF, **fields})


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in a loader worker: on 2 shared cores, per-image ops with two
    threads run tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ drawing views


def _pil_views(cfg: ViewsConfig, image: np.ndarray, *, branch: str = "query", seed: int = PIL_SEED,
               n: int = N) -> np.ndarray:
    """n views of one (H, W, C) uint8 image by the PIL back-end -> (n, C, SIZE, SIZE) 8-bit values."""
    channels = image.shape[2]
    view = getattr(A.build_views(cfg, size=SIZE, channels=channels), branch)
    img = Image.fromarray(image[..., 0] if channels == 1 else image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([view(img) for _ in range(n)])
    return _pixels(out * A.STD + A.MEAN)


def _tensor_views(cfg: ViewsConfig, image: np.ndarray, *, local: bool = False, seed: int = TENSOR_SEED,
                  n: int = N) -> np.ndarray:
    """n views of one (H, W, C) uint8 image by the tensor back-end, in one batch -> (n, C, H, W) 8-bit values."""
    views = A.BatchViews(cfg, channels=image.shape[2])
    batch = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).repeat(n, 1, 1, 1)
    return _pixels(views.branch(views.unit(batch), local=local, generator=torch.Generator().manual_seed(seed)))


def _pixels(x: torch.Tensor) -> np.ndarray:
    """[0, 1] floats -> 0-255 values on the 8-bit grid, as float64."""
    return (x.double() * 255).round().numpy()


# ------------------------------------------------------------------ crop box


def _ramp(size: int, step: int) -> np.ndarray:
    """(size, size, 3) uint8: red = step * x, green = step * y, blue = 128."""
    u = np.arange(size) * step
    image = np.full((size, size, 3), 128, np.uint8)
    image[..., 0], image[..., 1] = u[None, :], u[:, None]
    return image


def _decoded(image: np.ndarray) -> np.ndarray:
    """What the loader's workers hand the tensor back-end: the image resized to SIZE."""
    return A.build_decode_transform(size=SIZE, channels=3)(Image.fromarray(image)).permute(1, 2, 0).numpy()


def _crop_box(views: np.ndarray) -> dict[str, np.ndarray]:
    """Views of the SOURCE ramp -> each view's box as fractions of the image: w, h, cx, cy.

    A view's value at output column i is the mean source column it sampled (value + 0.5, in
    source pixels), linear in i with slope = box width / SIZE; a line fitted over the columns
    off the border gives the width, and its mean (at column 15.5) the box's centre.
    """
    cols = np.arange(2, SIZE - 2)
    box = {}
    for axis, channel, mean_over in (("x", 0, 1), ("y", 1, 2)):
        coord = views[:, channel].mean(mean_over)[:, cols] + 0.5  # (N, len(cols))
        box["w" if axis == "x" else "h"] = _slope(coord, cols) * SIZE / SOURCE
        box["c" + axis] = coord.mean(1) / SOURCE
    return box


def _rrc_marginals(scale: tuple[float, float]) -> tuple:
    """torchvision RandomResizedCrop's CDFs of (area fraction, log aspect) of the boxes it keeps.

    It draws area ~ U(scale) and log aspect ~ U(log 3/4, log 4/3) and redraws (up to 10 times)
    a box wider or taller than the image, so the pair is uniform on the part of the rectangle
    where |log aspect| <= -log area. Ten misses in a row (~1e-8 at the default scale) fall back
    to the whole image; ignored here.
    """
    edge = math.log(4 / 3)
    area, log_aspect = np.linspace(*scale, 2001), np.linspace(-edge, edge, 2001)
    inside = np.abs(log_aspect)[None, :] <= -np.log(area)[:, None]

    def cdf(mass, grid):
        return lambda x: np.interp(x, grid, np.cumsum(mass) / mass.sum())

    return cdf(inside.sum(1), area), cdf(inside.sum(0), log_aspect)


@functools.cache
def _crop_sample(recipe: str, side: str, backend: str, crop_scale: tuple = (0.2, 1.0)) -> dict[str, np.ndarray]:
    """The boxes of ``side``'s views under ``recipe`` (N views if it crops, else a few)."""
    cfg = ViewsConfig(recipe=recipe, **{**OFF, "crop_scale": list(crop_scale)})
    views = A.BatchViews(cfg, channels=3)
    n = N if views.local[side] else 50
    seed = {"query": 0, "key": 10}[side]  # the two branches of local_local draw different boxes
    if backend == "pil":
        return _crop_box(_pil_views(cfg, _ramp(SOURCE, 1), branch=side, seed=PIL_SEED + seed, n=n))
    image = _decoded(_ramp(SOURCE, 1))
    return _crop_box(_tensor_views(cfg, image, local=views.local[side], seed=TENSOR_SEED + seed, n=n))


@pytest.mark.parametrize("recipe", ["local_global", "local_local", "global_global"])
def test_crop_area_aspect_and_centre_match(recipe):
    """Local branches: box area, log aspect and centre drawn alike, area and aspect as
    torchvision's redraw rule gives; global branches always see the whole image.

    The PIL back-end crops the full-resolution source (256 px: torchvision's integer boxes are
    then fine enough to compare with continuous ones), the tensor back-end the decoded 32 px
    image, as the loader runs them.
    """
    area_cdf, log_aspect_cdf = _rrc_marginals((0.2, 1.0))
    for side, local in A.cropping_branches(ViewsConfig(recipe=recipe)).items():
        pil, ten = (_crop_sample(recipe, side, backend) for backend in ("pil", "tensor"))
        if not local:
            for box in (pil, ten):
                np.testing.assert_allclose(np.stack([box["w"], box["h"]]), 1.0, atol=0.01)
                np.testing.assert_allclose(np.stack([box["cx"], box["cy"]]), 0.5, atol=0.01)
            continue
        area, log_aspect = (lambda b: b["w"] * b["h"]), (lambda b: np.log(b["w"] / b["h"]))
        p = {f"{side} {name}": _ks(stat(pil), stat(ten)) for name, stat in
             {"area": area, "log aspect": log_aspect, "cx": lambda b: b["cx"], "cy": lambda b: b["cy"]}.items()}
        for name, box in (("pil", pil), ("tensor", ten)):
            p[f"{side} {name} area vs analytic"] = stats.kstest(area(box), area_cdf).pvalue
            p[f"{side} {name} log aspect vs analytic"] = stats.kstest(log_aspect(box), log_aspect_cdf).pvalue
        _check(p)


@pytest.mark.xfail(strict=True, reason=(
    "torchvision rounds a crop box to whole source pixels and keeps boxes up to half a pixel too "
    "large (as the full width); from a 32 px source that makes the PIL back-end's crops about 2 % "
    "larger in area (mean 0.551 against 0.537) and 4 % full-width. BatchViews draws continuous "
    "boxes, torchvision's limit for a fine source (test_crop_area_aspect_and_centre_match)."))
def test_crop_area_matches_on_a_32px_source():
    """The same comparison with the PIL back-end cropping a 32 px source, on the drawn boxes
    themselves (torchvision's own ``make_params``; 20,000 each, as the gap is a few percent)."""
    draws, cfg = 20000, _cfg(recipe="local_global")
    crop, img = v2.RandomResizedCrop(SIZE, scale=tuple(cfg.crop_scale)), Image.new("RGB", (SIZE, SIZE))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PIL_SEED)
        pil = np.array([[b["width"] * b["height"]] for b in (crop.make_params([img]) for _ in range(draws))])[:, 0]
    theta = A.BatchViews(cfg, channels=3).geometry(draws, local=True, like=torch.zeros(1),
                                                    generator=torch.Generator().manual_seed(TENSOR_SEED))
    _check({"area pil vs tensor": _ks(pil / SIZE**2, (theta[:, 0, 0] * theta[:, 1, 1]).numpy())})


# ------------------------------------------------------------------ flips and rotation


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE] + 0.5 - SIZE / 2
_DISC = _XX**2 + _YY**2 <= 12**2  # view pixels whose input point stays inside the image at any angle
_FIT = np.linalg.pinv(np.stack([_XX[_DISC], _YY[_DISC], np.ones(_DISC.sum())], 1))  # (3, K)
_STEP = 8  # the SIZE ramp's step: 32 x 8 = 256 levels


def _orientation(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of the SIZE ramp -> (reflected, angle in degrees in [0, 360)) of each view's map.

    The affine fit c = M o maps view to input coordinates (centred, y down). torchvision's
    ``rotate(img, t)`` reads M = [[cos t, -sin t], [sin t, cos t]] = R(t) and ``hflip`` reads
    H = diag(-1, 1) (test_orientation_readout_is_calibrated). Flips then a rotation give
    M = H^a V^b R(t) = H^(a xor b) R(t + 180 b), read back as reflected = det M < 0 and the
    angle of H^reflected M.
    """
    coords = np.stack([views[:, 0][:, _DISC], views[:, 1][:, _DISC]], 2) / _STEP + 0.5 - SIZE / 2  # (N, K, 2)
    m = np.einsum("ak,nkb->nba", _FIT, coords)[:, :, :2]  # (N, 2, 2)
    reflected = np.linalg.det(m) < 0
    m[reflected, 0] *= -1  # H @ M
    return reflected, np.degrees(np.arctan2(m[:, 1, 0], m[:, 0, 0])) % 360.0


def test_orientation_readout_is_calibrated():
    """The read-out gives torchvision's own angle and flips on single known ops."""
    img = Image.fromarray(_ramp(SIZE, _STEP))
    ops = {(False, 30.0): TF.rotate(img, 30.0, interpolation=TF.InterpolationMode.BILINEAR),
           (True, 0.0): TF.horizontal_flip(img), (True, 180.0): TF.vertical_flip(img)}
    for (reflected, angle), out in ops.items():
        r, a = _orientation(_pixels(TF.pil_to_tensor(out).unsqueeze(0).double() / 255))
        assert r[0] == reflected and abs(a[0] - angle) < 0.5, (reflected, angle, r, a)


ORIENTATIONS = {  # name: (flips, vflip, rotation); rotation <= 180, so no angle wraps past 360
    "flips_and_rotation": (True, True, 180.0),  # the default (CCRL)
    "hflip_and_rotation": (True, False, 180.0),  # data.views.vflip=false
    "rotation_only": (False, True, 90.0),
}


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_flips_and_rotation_angle_match(name):
    """Reflection and angle, as one number (angle + 360 x reflected), drawn alike, and as
    torchvision's RandomHorizontalFlip, RandomVerticalFlip (p = 0.5 each) then
    RandomRotation((0, r)) give: angle ~ U(0, r) + 180 x vertical, reflected = horizontal xor vertical."""
    flips, vflip, rotation = ORIENTATIONS[name]
    cfg = _cfg(flips=flips, vflip=vflip, rotation=rotation)
    code = [a + 360.0 * r for r, a in (_orientation(_pil_views(cfg, _ramp(SIZE, _STEP))),
                                       _orientation(_tensor_views(cfg, _ramp(SIZE, _STEP))))]
    p_reflected = 0.5 if flips else 0.0

    def analytic(s):  # CDF of angle + 360 x reflected
        angle, reflected = np.mod(s, 360.0), s >= 360.0
        turned = stats.uniform(0, rotation).cdf(angle)
        if flips and vflip:  # half the views turned a further 180 degrees
            turned = 0.5 * turned + 0.5 * stats.uniform(180.0, rotation).cdf(angle)
        return np.where(reflected, (1 - p_reflected) + p_reflected * turned, (1 - p_reflected) * turned)

    _check({"pil vs tensor": _ks(*code), "pil vs analytic": stats.kstest(code[0], analytic).pvalue,
            "tensor vs analytic": stats.kstest(code[1], analytic).pvalue})


@pytest.mark.parametrize("vflip", [True, False])
def test_flip_states_are_equally_likely(vflip):
    """Without rotation the flips are read exactly: none, h, v, h+v each 1/4 (with
    vflip=false: none, h each 1/2) in both back-ends, and alike between them."""
    cfg = _cfg(flips=True, vflip=vflip)
    counts = []
    for views in (_pil_views(cfg, _ramp(SIZE, _STEP)), _tensor_views(cfg, _ramp(SIZE, _STEP))):
        reflected, angle = _orientation(views)
        half_turn = np.abs(angle - 180.0) < 0.5
        assert np.all(half_turn | (np.minimum(angle, 360.0 - angle) < 0.5))  # only 0 or 180 degrees
        counts.append(np.bincount(2 * half_turn + reflected, minlength=4))  # none, h, h+v, v
    counts = np.array(counts)
    possible = slice(None) if vflip else slice(0, 2)
    assert counts[:, 2:].sum() == 0 or vflip, counts
    p = {f"{name} vs uniform": stats.chisquare(c[possible]).pvalue for name, c in zip(("pil", "tensor"), counts)}
    p["pil vs tensor"] = stats.chi2_contingency(counts[:, possible]).pvalue
    _check(p)


# ------------------------------------------------------------------ colour jitter


def _columns(red, green=None) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 with red[j] in column j's red channel, green[j] (default red) in green and blue."""
    red = np.asarray(red)
    green = red if green is None else np.broadcast_to(green, red.shape)
    return np.broadcast_to(np.stack([red, green, green], 1)[None], (SIZE, SIZE, 3)).astype(np.uint8)


def _slope(y: np.ndarray, x: np.ndarray, *, through_origin: bool = False) -> np.ndarray:
    """Least-squares slope of each view's values y (N, ...) on the probe's x (...)."""
    y, x = y.reshape(len(y), -1), np.broadcast_to(x, y.shape[1:]).reshape(-1)
    if not through_origin:
        y, x = y - y.mean(1, keepdims=True), x - x.mean()
    return (y * x).sum(1) / (x * x).sum()


def _hue(views: np.ndarray) -> np.ndarray:
    rgb = torch.from_numpy(views.mean((2, 3)) / 255).view(-1, 3, 1, 1).float()
    return A._rgb_to_hsv(rgb)[:, 0, 0, 0].double().numpy()


# Each factor is a regression over many 8-bit levels, so the grid blurs it far less than its
# range: brightness scales the levels, contrast scales them about their mean (128), saturation
# scales R - G (luma cancels), hue turns the hue of one colour.
_BRIGHT = 20 + 5 * np.arange(SIZE)  # x 1.4 stays below 255
_CONTRAST = 66 + 4 * np.arange(SIZE)  # mean 128; 128 +- 1.4 x 62 stays inside [0, 255]
_CHROMA = 100 + 3 * np.arange(SIZE)  # red; green and blue 100
_HUE = (200, 120, 40)
JITTER = {  # op: (index in data.views.jitter, probe, read-out, centre of the factor's range)
    "brightness": (0, lambda: _columns(_BRIGHT), lambda v: _slope(v[:, 0], _BRIGHT, through_origin=True), 1.0),
    "contrast": (1, lambda: _columns(_CONTRAST), lambda v: _slope(v[:, 0], _CONTRAST), 1.0),
    "saturation": (2, lambda: _columns(_CHROMA, 100),
                   lambda v: _slope(v[:, 0] - v[:, 1], _CHROMA - 100, through_origin=True), 1.0),
    "hue": (3, lambda: np.ascontiguousarray(np.broadcast_to(np.array(_HUE, np.uint8), (SIZE, SIZE, 3))),
            lambda v: np.mod(_hue(v) - _hue(np.array(_HUE, float).reshape(1, 3, 1, 1)) + 0.5, 1.0) - 0.5, 0.0),
}
STRENGTH = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}  # MoCo v2's, the default


def _jitter_cfg(op: str, strength: float) -> ViewsConfig:
    jitter = [0.0] * 4
    jitter[JITTER[op][0]] = strength
    return _cfg(jitter=jitter, p_jitter=0.8)


@functools.cache
def _jitter_sample(op: str, channels: int, backend: str, strength: float) -> np.ndarray:
    """The factor read off N views of op's probe, op alone at ``strength``, p_jitter 0.8 -> (N,)."""
    _, probe, read, _ = JITTER[op]
    image, cfg = probe()[..., :channels], _jitter_cfg(op, strength)
    return read(_pil_views(cfg, image) if backend == "pil" else _tensor_views(cfg, image))


@pytest.mark.parametrize("op,channels", [("brightness", 3), ("contrast", 3), ("saturation", 3), ("hue", 3),
                                         ("brightness", 1), ("contrast", 1)])
def test_jitter_factors_match(op, channels):
    """Each jitter factor alone (p_jitter 0.8) drawn alike, and ~ U(centre -+ strength) in the
    jittered views (those whose factor is off the centre by more than the read-out resolves)."""
    centre, strength = JITTER[op][3], STRENGTH[op]
    pil, ten = (_jitter_sample(op, channels, backend, strength) for backend in ("pil", "tensor"))
    hole = 0.02 * strength  # factors this close to the centre are not told from "not jittered"
    p = {"pil vs tensor": _ks(pil, ten)}
    for name, factor in (("pil", pil), ("tensor", ten)):
        on = factor[np.abs(factor - centre) > hole]
        folded = np.where(on > centre, on - 2 * hole, on)  # U(range) less the hole, closed up
        analytic = _uniform_cdf(centre - strength, centre + strength - 2 * hole)
        p[f"{name} vs analytic"] = stats.kstest(folded, analytic).pvalue
    _check(p)


def test_jitter_probability_matches():
    """p_jitter 0.8: the views left exactly as they were are the 20 % not jittered plus the
    jittered ones whose brightness factor rounds back to the input, |b - 1| < 0.5 / 175."""
    cfg, image = _jitter_cfg("brightness", 0.4), JITTER["brightness"][1]()
    untouched = [int((views == image.transpose(2, 0, 1)).all((1, 2, 3)).sum())
                 for views in (_pil_views(cfg, image), _tensor_views(cfg, image))]
    expected = (1 - cfg.p_jitter) + cfg.p_jitter * (1 / _BRIGHT.max()) / (2 * 0.4)
    _check({"pil vs tensor": _same_rate(*untouched),
            "pil vs analytic": stats.binomtest(untouched[0], N, expected).pvalue,
            "tensor vs analytic": stats.binomtest(untouched[1], N, expected).pvalue})


# ------------------------------------------------------------------ grayscale


_GRAY_PROBE = (150, 110, 90)  # no channel clips under the default jitter


@functools.cache
def _gray_sample(backend: str, p_gray: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Default jitter then grayscale at p_gray -> (is grey (N,), the grey views' level)."""
    cfg = _cfg(p_jitter=0.8, jitter=[0.4, 0.4, 0.4, 0.1], p_gray=p_gray)
    image = np.broadcast_to(np.array(_GRAY_PROBE, np.uint8), (SIZE, SIZE, 3))
    views = _pil_views(cfg, np.ascontiguousarray(image)) if backend == "pil" else _tensor_views(cfg, image)
    grey = (views[:, 0] == views[:, 1]).all((1, 2)) & (views[:, 1] == views[:, 2]).all((1, 2))
    return grey, views[grey, 0].mean((1, 2))


def test_grayscale_probability_matches():
    """p_gray 0.2 after the default jitter: views with R == G == B are alike in number and
    binomial(N, 0.2); their grey level (set by the jitter before) is drawn alike."""
    (pil, pil_level), (ten, ten_level) = _gray_sample("pil"), _gray_sample("tensor")
    _check({"pil vs tensor": _same_rate(pil.sum(), ten.sum()),
            "pil vs analytic": stats.binomtest(int(pil.sum()), N, 0.2).pvalue,
            "tensor vs analytic": stats.binomtest(int(ten.sum()), N, 0.2).pvalue,
            "grey level pil vs tensor": _ks(pil_level, ten_level)})


# ------------------------------------------------------------------ blur


BLUR_KERNEL = 9  # wide enough that sigma up to 2 shows in the profile (the 32 px default, 3, saturates)


def _spread(views: np.ndarray) -> np.ndarray:
    """Views of a step edge (0 | 255 between columns 15 and 16) -> sum_i |i| k_i of the kernel k.

    Column 15 - j of the blurred edge is 255 (k_(j+1) + k_(j+2) + ...), column 16 + j its
    mirror image, so the profile's total departure from the step is 255 sum_i |i| k_i (0: no blur).
    """
    row = views[:, 0].mean(1)  # (N, SIZE)
    return (row[:, :SIZE // 2].sum(1) + (255 - row[:, SIZE // 2:]).sum(1)) / 255


def _kernel_spread(sigma: np.ndarray) -> np.ndarray:
    i = np.arange(-(BLUR_KERNEL // 2), BLUR_KERNEL // 2 + 1)
    k = np.exp(-0.5 * (i[None, :] / sigma[:, None]) ** 2)
    return (np.abs(i) * k).sum(1) / k.sum(1)


@functools.cache
def _blur_sample(backend: str, sigma_high: float = 2.0, kernel: int = BLUR_KERNEL) -> np.ndarray:
    cfg = _cfg(p_blur=0.5, blur_sigma=[0.1, sigma_high], blur_kernel=kernel)
    image = _columns(np.where(np.arange(SIZE) < SIZE // 2, 0, 255))
    return _spread(_pil_views(cfg, image) if backend == "pil" else _tensor_views(cfg, image))


def test_blur_probability_and_sigma_match():
    """p_blur 0.5, sigma ~ U(0.1, 2): the edge's spread drawn alike (also with the default
    kernel, 3 at 32 px); sigma read back from it is, above 0.5 (where the 8-bit grid resolves
    it), U(0.5, 2), in p_blur x 1.5 / 1.9 of the views."""
    pil, ten = _blur_sample("pil"), _blur_sample("tensor")
    grid = np.linspace(0.05, 2.5, 5000)
    p = {"pil vs tensor": _ks(pil, ten), "default kernel pil vs tensor": _ks(
        *(_blur_sample(backend, kernel=0) for backend in ("pil", "tensor")))}
    for name, spread in (("pil", pil), ("tensor", ten)):
        sigma = np.interp(spread, _kernel_spread(grid), grid)
        wide = sigma[(spread > 0) & (sigma > 0.5)]
        p[f"{name} sigma vs analytic"] = stats.kstest(wide, _uniform_cdf(0.5, 2.0)).pvalue
        p[f"{name} rate vs analytic"] = stats.binomtest(len(wide), N, 0.5 * 1.5 / 1.9).pvalue
    _check(p)


# ------------------------------------------------------------------ negative controls


# ------------------------------------------------------------------ HED stain jitter


def _hed_sample(strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale and shift of each stain in N tensor-back-end views of a probe whose H, E and DAB amounts
    vary over the pixels (0.05-0.15, so no view leaves the [0, 1] range): (N * 3,) each, read by a
    line fitted per view and stain between input and output amounts, in floats."""
    stains = torch.from_numpy(np.random.default_rng(5).uniform(0.05, 0.15, size=(1, 3, SIZE, SIZE))).float()
    probe = A.hed_to_rgb(stains)
    views = A.BatchViews(_cfg(hed=strength), channels=3)
    out = views.branch(probe.repeat(N, 1, 1, 1), local=False, generator=torch.Generator().manual_seed(TENSOR_SEED))
    x = A.rgb_to_hed(probe).double().flatten(2)  # (1, 3, P)
    y = A.rgb_to_hed(out).double().flatten(2)  # (N, 3, P)
    xc = x - x.mean(2, keepdim=True)
    scale = ((y - y.mean(2, keepdim=True)) * xc).sum(2) / (xc * xc).sum(2)
    shift = y.mean(2) - scale * x.mean(2)
    return scale.flatten().numpy(), shift.flatten().numpy()


def test_hed_scale_and_shift_follow_their_laws():
    scale, shift = _hed_sample(0.05)
    _check({"scale ~ U(0.95, 1.05)": stats.kstest(scale, _uniform_cdf(0.95, 1.05)).pvalue,
            "shift ~ U(-0.05, 0.05)": stats.kstest(shift, _uniform_cdf(-0.05, 0.05)).pvalue})
    _check({"scale vs U(0.96, 1.04)": stats.kstest(scale, _uniform_cdf(0.96, 1.04)).pvalue,
            "shift vs U(-0.04, 0.04)": stats.kstest(shift, _uniform_cdf(-0.04, 0.04)).pvalue},
           above=0.0, below=POWER)  # the read-out tells a 20 % narrower law apart


def test_the_comparisons_reject_a_changed_parameter():
    """Power at N: the tensor back-end with one parameter changed is told from the PIL back-end."""
    area = lambda b: b["w"] * b["h"]  # noqa: E731
    _check({
        "p_gray 0.4 vs 0.2": _same_rate(_gray_sample("pil")[0].sum(), _gray_sample("tensor", 0.4)[0].sum()),
        "crop_scale (0.5, 1) vs (0.2, 1)": _ks(area(_crop_sample("local_global", "query", "pil")),
                                               area(_crop_sample("local_global", "query", "tensor", (0.5, 1.0)))),
        "blur_sigma (0.1, 1) vs (0.1, 2)": _ks(_blur_sample("pil"), _blur_sample("tensor", 1.0)),
        "brightness 0.3 vs 0.4": _ks(_jitter_sample("brightness", 3, "pil", 0.4),
                                     _jitter_sample("brightness", 3, "tensor", 0.3)),
    }, above=0.0, below=POWER)


# ------------------------------------------------------------------ statistics


def _uniform_cdf(low: float, high: float):
    return stats.uniform(low, high - low).cdf


def _ks(x: np.ndarray, y: np.ndarray) -> float:
    return stats.ks_2samp(x, y).pvalue


def _same_rate(k1: int, k2: int) -> float:
    """Chi-square p-value that two counts out of N share one probability."""
    return stats.chi2_contingency([[k1, N - k1], [k2, N - k2]]).pvalue


def _check(p: dict[str, float], *, above: float = ALPHA, below: float = 1.0) -> None:
    """Every p-value in ``p`` is above ``above`` and below ``below``; the message lists them all."""
    assert min(p.values()) > above and max(p.values()) < below, {k: f"{v:.3g}" for k, v in p.items()}


# ------------------------------------------------------------------ gamma jitter


def _gamma_sample(strength: float) -> np.ndarray:
    """log g of N tensor-back-end views of a flat one-channel 0.5 probe: log(log y / log 0.5)."""
    probe = torch.full((1, 1, SIZE, SIZE), 0.5)
    views = A.BatchViews(_cfg(gamma=strength, flips=False, rotation=0.0, p_jitter=0.0, p_blur=0.0), channels=1)
    out = views.branch(probe.repeat(N, 1, 1, 1), local=False, generator=torch.Generator().manual_seed(TENSOR_SEED))
    level = out.double().mean((1, 2, 3)).numpy()
    return np.log(np.log(level) / np.log(0.5))


def test_gamma_follows_its_law():
    log_g = _gamma_sample(0.5)
    _check({"log g ~ U(-0.5, 0.5)": stats.kstest(log_g, _uniform_cdf(-0.5, 0.5)).pvalue})
    _check({"log g vs U(-0.4, 0.4)": stats.kstest(log_g, _uniform_cdf(-0.4, 0.4)).pvalue},
           above=0.0, below=POWER)  # the read-out tells a 20 % narrower law apart
