"""SupCAM's category-variant image composition (Algorithm 1).

A primary and a candidate image of chromosome clusters are shifted inside the box that
their two bounding boxes could fill, laid over each other, and the result is labelled by
a look-up table from the parents' cluster types and how many foreground pixels overlap:

    image, label, info = compose(primary, candidate, label_p=0, label_c=2, roles=["I", "T", "O", "TO"],
                                 rng=np.random.default_rng(0))

Cluster types (roles): I instance, T touching, O overlapping, TO touching-overlapping.
``roles[label]`` names the type of each dataset label; a dataset without some type (the
two-class single/cluster set) simply never produces it: a composite whose type has no
label counts as uncertain, unless ``composite`` names the class each composite type takes
(for single vs cluster: roles ("I", "TO") and composite {"T": 1, "O": 1, "TO": 1}).

- Foreground: pixels differing from ``background`` by more than ``threshold`` in any
  channel (the paper's images have a black background; karyograms are white: background
  255). Pixels of neither image become ``background``.
- Shift ranges: R_x = (min(W, W_Bp + W_Bc) - W_Bi) / 2 per image i (same for y), integer
  shifts drawn uniformly from [-R, R]. Images of different sizes are first centred on a
  canvas of the larger height and width (the paper pads everything to 224 x 224).
- Overlap (both foreground): ``combine`` "equal" 0.5 p + 0.5 c (the paper's choice), "lambda"
  lam p + (1 - lam) c with lam ~ Beta(1, 1) per composite, or "max": the more strongly
  stained pixel (farther from the background). Averages are the same on an inverted scale.
- N_cap = overlapping foreground pixels; touching when N_cap <= ``p_cap`` (200), else
  overlapping. Up to ``tries`` (10) draws while the table says uncertain, then the
  candidate itself is returned with its own label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from sslkit.sharding.core.imaging import centre_on

ROLES = ("I", "T", "O", "TO")
TABLES = ("middle", "light", "heavy", "none")
COMBINES = ("equal", "lambda", "max")
_O_PAIRS = {frozenset({"I"}), frozenset({"O", "I"}), frozenset({"O"})}  # (I,I), (O,I), (O,O)


def lookup(table: str, role_p: str, role_c: str, *, overlapping: bool) -> Optional[str]:
    """The composite's cluster type under ``table``, or None for uncertain. Never "I".

    Touching (every table): TO when either parent is O or TO, else T. Overlapping: middle
    gives O for (I,I), (O,I), (O,O) and uncertain otherwise; light O only for (I,I); heavy
    O for those three pairs and TO for all others.
    """
    if table not in TABLES or table == "none":
        raise ValueError(f"table must be one of {TABLES[:3]} here ('none' composes nothing), got {table!r}.")
    if role_p not in ROLES or role_c not in ROLES:
        raise ValueError(f"Cluster types must be among {ROLES}, got {role_p!r} and {role_c!r}.")
    pair = frozenset({role_p, role_c})
    if not overlapping:
        return "TO" if pair & {"O", "TO"} else "T"
    if table == "light":
        return "O" if pair == frozenset({"I"}) else None
    if pair in _O_PAIRS:
        return "O"
    return "TO" if table == "heavy" else None


def foreground(image: np.ndarray, *, background: int = 0, threshold: int = 0) -> np.ndarray:
    """(H, W) bool: pixels of (H, W) or (H, W, C) ``image`` farther than ``threshold`` from ``background``."""
    diff = np.abs(image.astype(np.int16) - background)
    return (diff.max(axis=2) if diff.ndim == 3 else diff) > threshold


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends, of the True pixels; the whole image when there are none."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return 0, 0, mask.shape[1], mask.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def shift_ranges(box_p: tuple[int, ...], box_c: tuple[int, ...], width: int, height: int
                 ) -> tuple[tuple[float, float], tuple[float, float]]:
    """((R_px, R_py), (R_cx, R_cy)): R_ix = (min(W, W_Bp + W_Bc) - W_Bi) / 2, likewise for y."""
    wp, hp = box_p[2] - box_p[0], box_p[3] - box_p[1]
    wc, hc = box_c[2] - box_c[0], box_c[3] - box_c[1]
    span_x, span_y = min(width, wp + wc), min(height, hp + hc)
    return ((span_x - wp) / 2, (span_y - hp) / 2), ((span_x - wc) / 2, (span_y - hc) / 2)


def translate(image: np.ndarray, dx: int, dy: int, *, background: int) -> np.ndarray:
    """``image`` moved by (dx, dy) pixels on a canvas of the same size; uncovered pixels = background."""
    out = np.full_like(image, background)
    h, w = image.shape[:2]
    src_x, dst_x = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    src_y, dst_y = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    if src_x.start < src_x.stop and src_y.start < src_y.stop:
        out[dst_y, dst_x] = image[src_y, src_x]
    return out


def overlay(p: np.ndarray, c: np.ndarray, *, background: int = 0, threshold: int = 0, combine: str = "equal",
            lam: float = 0.5) -> tuple[np.ndarray, int]:
    """Algorithm 1, line 9, on two aligned images: (composite, N_cap = overlapping foreground pixels)."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}.")
    mp, mc = foreground(p, background=background, threshold=threshold), foreground(c, background=background,
                                                                                  threshold=threshold)
    both = mp & mc
    out = np.full_like(p, background)
    out[mp & ~mc], out[mc & ~mp] = p[mp & ~mc], c[mc & ~mp]
    pb, cb = p[both].astype(np.float32), c[both].astype(np.float32)
    if combine == "max":
        farther = np.abs(pb - background) >= np.abs(cb - background)
        mixed = np.where(farther, pb, cb)
    else:
        weight = 0.5 if combine == "equal" else lam
        mixed = weight * pb + (1.0 - weight) * cb
    out[both] = np.clip(np.rint(mixed), 0, 255).astype(p.dtype)
    return out, int(both.sum())


@dataclass(frozen=True)
class Composed:
    """What ``compose`` did: ``tries`` draws, the last ``overlap`` (N_cap), whether it composed,
    the composite's type, and the last shifts (dx_p, dy_p, dx_c, dy_c)."""

    tries: int
    overlap: int
    composed: bool
    role: Optional[str]
    shifts: tuple[int, int, int, int] = (0, 0, 0, 0)


def compose(
    primary: np.ndarray, candidate: np.ndarray, *, label_p: int, label_c: int, roles: Sequence[str],
    rng: np.random.Generator, table: str = "middle", p_cap: int = 200, tries: int = 10, combine: str = "equal",
    background: int = 0, threshold: int = 0, composite: Optional[Mapping[str, int]] = None,
) -> tuple[np.ndarray, int, Composed]:
    """Compose (image, label) from a primary and a candidate sample, or return the candidate.

    Args:
        primary, candidate: (H, W) or (H, W, C) uint8 images, centred on a common canvas
            (the larger height and width) when their sizes differ.
        label_p, label_c: their dataset labels; ``roles[label]`` is the cluster type of a label.
        rng: the generator that draws shifts (and lambda).
        table, p_cap, tries, combine, background, threshold: see the module notes.
        composite: the label of each composite type (T, O, TO); by default the class whose
            role it is. A two-class single/cluster set maps all three to its cluster class.

    Returns:
        (image, label, Composed). With ``table="none"`` or after ``tries`` uncertain draws,
        the candidate and ``label_c``.
    """
    if p_cap < 0 or tries < 1:
        raise ValueError(f"p_cap must be >= 0 and tries >= 1, got {p_cap} and {tries}.")
    role_to_label = {role: i for i, role in enumerate(roles)} if composite is None else dict(composite)
    if table == "none":
        return candidate, label_c, Composed(tries=0, overlap=0, composed=False, role=None)
    shape = (max(primary.shape[0], candidate.shape[0]), max(primary.shape[1], candidate.shape[1]),
             *primary.shape[2:])
    primary, candidate_fit = centre_on(primary, shape, background), centre_on(candidate, shape, background)
    h, w = shape[:2]
    box_p = bounding_box(foreground(primary, background=background, threshold=threshold))
    box_c = bounding_box(foreground(candidate_fit, background=background, threshold=threshold))
    (rpx, rpy), (rcx, rcy) = shift_ranges(box_p, box_c, w, h)
    overlap = 0
    for n in range(1, tries + 1):
        sx = [int(rng.integers(-int(r), int(r) + 1)) for r in (rpx, rcx)]
        sy = [int(rng.integers(-int(r), int(r) + 1)) for r in (rpy, rcy)]
        lam = float(rng.beta(1.0, 1.0)) if combine == "lambda" else 0.5
        image, overlap = overlay(translate(primary, sx[0], sy[0], background=background),
                                 translate(candidate_fit, sx[1], sy[1], background=background),
                                 background=background, threshold=threshold, combine=combine, lam=lam)
        role = lookup(table, roles[label_p], roles[label_c], overlapping=overlap > p_cap)
        shifts = (sx[0], sy[0], sx[1], sy[1])
        if role is not None and role in role_to_label:
            return image, role_to_label[role], Composed(n, overlap, True, role, shifts)
    return candidate, label_c, Composed(tries, overlap, False, None, shifts)


__all__ = ["COMBINES", "ROLES", "TABLES", "Composed", "bounding_box", "compose", "foreground", "lookup",
           "overlay", "shift_ranges", "translate"]
