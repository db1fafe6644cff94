"""SupCAM's category-variant composition: look-up tables, overlap counts, shift ranges, fallback."""

from __future__ import annotations

from itertools import combinations_with_replacement

import numpy as np
import pytest

from sslkit.data.compose import ROLES, bounding_box, compose, foreground, lookup, overlay, shift_ranges, translate

# The SupCAM paper's composite-label tables (docs/methods.md, SupCAM), written out pair by pair:
# (touching, overlapping); None = uncertain.
MIDDLE = {("I", "I"): ("T", "O"), ("I", "T"): ("T", None), ("I", "O"): ("TO", "O"), ("I", "TO"): ("TO", None),
          ("T", "T"): ("T", None), ("T", "O"): ("TO", None), ("T", "TO"): ("TO", None),
          ("O", "O"): ("TO", "O"), ("O", "TO"): ("TO", None), ("TO", "TO"): ("TO", None)}
LIGHT = {pair: (t, "O" if pair == ("I", "I") else None) for pair, (t, _) in MIDDLE.items()}
HEAVY = {pair: (t, o if o is not None else "TO") for pair, (t, o) in MIDDLE.items()}


@pytest.mark.parametrize("table, expected", [("middle", MIDDLE), ("light", LIGHT), ("heavy", HEAVY)])
def test_every_unordered_pair_follows_the_table(table: str, expected: dict) -> None:
    pairs = list(combinations_with_replacement(ROLES, 2))
    assert len(pairs) == 10 and set(pairs) == set(expected)
    for (a, b), (touching, overlapping) in expected.items():
        for first, second in ((a, b), (b, a)):  # the order of primary and candidate does not matter
            assert lookup(table, first, second, overlapping=False) == touching
            assert lookup(table, first, second, overlapping=True) == overlapping
            assert "I" not in (lookup(table, first, second, overlapping=False),
                               lookup(table, first, second, overlapping=True))


def test_lookup_refuses_unknown_tables_and_types() -> None:
    with pytest.raises(ValueError, match="table"):
        lookup("none", "I", "I", overlapping=True)
    with pytest.raises(ValueError, match="Cluster types"):
        lookup("middle", "I", "X", overlapping=True)


def _drawn() -> tuple[np.ndarray, np.ndarray]:
    p = np.zeros((20, 20), np.uint8)
    c = np.zeros((20, 20), np.uint8)
    p[2:6, 2:12] = 100  # 4 x 10
    c[4:14, 8:11] = 200  # 10 x 3: overlaps p on rows 4-5, columns 8-10 -> 2 x 3 = 6 pixels
    return p, c


@pytest.mark.parametrize("combine, mixed", [("equal", 150), ("lambda", 125), ("max", 200)])
def test_overlay_counts_and_mixes_the_overlap_exactly(combine: str, mixed: int) -> None:
    p, c = _drawn()
    out, n = overlay(p, c, combine=combine, lam=0.75)  # lambda: 0.75 * 100 + 0.25 * 200
    assert n == 6
    both = (p > 0) & (c > 0)
    assert (out[both] == mixed).all()
    assert (out[(p > 0) & ~both] == 100).all() and (out[(c > 0) & ~both] == 200).all()
    assert (out[(p == 0) & (c == 0)] == 0).all()


def test_white_background_is_handled_on_the_inverted_scale() -> None:
    p, c = _drawn()
    p, c = 255 - p, 255 - c  # dark objects on white, as in karyograms
    out, n = overlay(p, c, background=255, threshold=10, combine="max")
    assert n == 6
    assert (out[(p < 255) & (c < 255)] == 55).all()  # max stain = the darker pixel
    assert (out[(p == 255) & (c == 255)] == 255).all()
    assert overlay(p, c, background=255, threshold=10)[0][4, 9] == 105  # equal: (155 + 55) / 2


def test_shift_ranges_follow_the_formula() -> None:
    p, c = _drawn()
    box_p, box_c = bounding_box(foreground(p)), bounding_box(foreground(c))
    assert box_p == (2, 2, 12, 6) and box_c == (8, 4, 11, 14)
    # W_Bp + W_Bc = 13 < 20: R_px = (13 - 10) / 2, R_cx = (13 - 3) / 2; H: 4 + 10 = 14 < 20
    assert shift_ranges(box_p, box_c, 20, 20) == ((1.5, 5.0), (5.0, 2.0))
    # a canvas smaller than the two boxes side by side caps the span at W
    assert shift_ranges(box_p, box_c, 11, 12) == ((0.5, 4.0), (4.0, 1.0))
    moved = translate(p, 3, -2, background=0)
    assert bounding_box(foreground(moved)) == (5, 0, 15, 4)


def test_composites_are_never_instances_and_stay_in_range() -> None:
    rng = np.random.default_rng(0)
    p, c = _drawn()
    roles = ["I", "T", "O", "TO"]
    labels_seen = set()
    for label_p in range(4):
        for label_c in range(4):
            for _ in range(20):
                image, label, info = compose(p, c, label_p=label_p, label_c=label_c, roles=roles, rng=rng,
                                             p_cap=3)
                labels_seen.add(label)
                if info.composed:
                    assert label != 0 and info.role == roles[label]
                    assert lookup("middle", roles[label_p], roles[label_c], overlapping=info.overlap > 3) == info.role
                    assert 1 <= info.tries <= 10
                    dxp, dyp, dxc, dyc = info.shifts
                    assert abs(dxp) <= 1.5 and abs(dyp) <= 5 and abs(dxc) <= 5 and abs(dyc) <= 2  # the R ranges
                    expected, n = overlay(translate(p, dxp, dyp, background=0), translate(c, dxc, dyc, background=0))
                    assert n == info.overlap and np.array_equal(image, expected)
                else:
                    assert label == label_c and image is c
    assert {1, 2, 3} <= labels_seen


def test_after_n_uncertain_tries_the_candidate_comes_back() -> None:
    full = np.full((8, 8), 120, np.uint8)  # all foreground: every draw overlaps 64 pixels > p_cap
    other = np.full((8, 8), 60, np.uint8)
    rng = np.random.default_rng(1)
    image, label, info = compose(full, other, label_p=1, label_c=0, roles=["I", "T", "O", "TO"], rng=rng,
                                 p_cap=10, tries=7)  # (T, I) overlapping: uncertain in the middle table
    assert image is other and label == 0 and not info.composed and info.tries == 7 and info.overlap == 64
    image, label, info = compose(full, other, label_p=1, label_c=0, roles=["I", "T", "O", "TO"], rng=rng,
                                 p_cap=10, table="heavy")  # heavy labels the same draw TO at once
    assert label == 3 and info.composed and info.tries == 1 and (image == 90).all()
    image, label, info = compose(full, other, label_p=1, label_c=0, roles=["I", "T", "O", "TO"], rng=rng,
                                 table="none")
    assert image is other and label == 0 and info.tries == 0


def test_a_type_the_dataset_lacks_counts_as_uncertain() -> None:
    p, c = _drawn()  # two-class data: single chromosome = I, cluster = T (say); O and TO have no label
    rng = np.random.default_rng(2)
    for _ in range(30):
        _, label, info = compose(p, c, label_p=0, label_c=0, roles=["I", "T"], rng=rng, p_cap=200)
        assert label in (0, 1) and (not info.composed or info.role == "T")


def test_real_karyogram_crops_compose_on_their_white_background() -> None:
    from pathlib import Path

    from sslkit.sharding.core.imaging import read_image

    root = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "chromosome-clusters" / "images"
    if not root.is_dir():
        pytest.skip("../shared/data/chromosome-clusters is not present")
    single = sorted((root / "case1" / "chromosome").glob("*"))[:3]
    cluster = sorted((root / "case1" / "cluster").glob("*"))[:3]
    rng = np.random.default_rng(3)
    for path_p, path_c in zip(single, cluster):
        p, c = read_image(path_p, channels=1), read_image(path_c, channels=1)
        image, label, info = compose(p, c, label_p=0, label_c=1, roles=["I", "T"], rng=rng, background=255,
                                     threshold=30, p_cap=200)
        canvas = (max(p.shape[0], c.shape[0]), max(p.shape[1], c.shape[1]))
        if info.composed:  # (I, T): touching -> T; overlapping -> uncertain in the middle table
            assert label == 1 and info.role == "T" and info.overlap <= 200 and image.shape == canvas
            dxp, dyp, dxc, dyc = info.shifts
            placed = []
            for img in (p, c):  # centred on the common canvas, on white
                out = np.full(canvas, 255, np.uint8)
                oy, ox = (canvas[0] - img.shape[0]) // 2, (canvas[1] - img.shape[1]) // 2
                out[oy:oy + img.shape[0], ox:ox + img.shape[1]] = img
                placed.append(out)
            expected, _ = overlay(translate(placed[0], dxp, dyp, background=255),
                                  translate(placed[1], dxc, dyc, background=255), background=255, threshold=30)
            assert np.array_equal(image, expected)
            assert (image < 225).sum() >= max((p < 225).sum(), (c < 225).sum()) * 0.5  # both crops still there
        else:
            assert label == 1 and image is c
    assert composed_any(single, cluster)


def composed_any(single: list, cluster: list) -> bool:
    """At least one of these pairs composes within 10 tries (a touching placement exists)."""
    from sslkit.sharding.core.imaging import read_image

    rng = np.random.default_rng(4)
    return any(compose(read_image(a, channels=1), read_image(b, channels=1), label_p=0, label_c=1,
                       roles=["I", "T"], rng=rng, background=255, threshold=30)[2].composed
               for a, b in zip(single, cluster))
