"""Finding the images and annotation files of a cell dataset, and pairing them.

Files are paired by relative stem (``Images/a.png`` + ``Labels/a.mat``) inside *groups*:
a folder holding an image folder and an annotation folder under any of the usual names
(``find_groups``), searched from the input folder down, so a dataset root with
``Train/`` and ``Test/`` works as well as one split folder. PanNuke's arrays are found by
``find_pannuke``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from sslkit.errors import MissingInput
from sslkit.sharding.core.imaging import IMAGE_EXTENSIONS

# Suffixes that label files often carry beyond the image's stem (a_label.png for a.png).
_LABEL_SUFFIX = re.compile(r"[_-](labels?|masks?|inst(ances?)?|instance_?map|ann(otations?)?|types?)$", re.I)


def find_groups(root: Path, image_dirs: tuple[str, ...], ann_dirs: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """(image folder, annotation folder) pairs: siblings named like ``image_dirs`` / ``ann_dirs``.

    Names compare case-insensitively; ``root`` itself and every folder below it are tried,
    in sorted order. Without any such pair, ``[(root, root)]`` (images beside annotations).
    """
    groups = []
    for parent, dirs, _ in os.walk(root):
        dirs.sort()
        lower = {d.lower(): d for d in dirs}
        image = next((lower[n] for n in image_dirs if n in lower), None)
        ann = next((lower[n] for n in ann_dirs if n in lower), None)
        if image and ann:
            groups.append((Path(parent) / image, Path(parent) / ann))
    return groups or [(root, root)]


def _files(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    # Not folder.plan.walk_images: that skips hidden folders, follows symlinked ones, lists
    # broken links and sorts by string ('a-b' before 'a/x'), which would change the pairs.
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts and p.is_file()
                  and not p.name.startswith("."))


def _stem_key(path: Path, folder: Path) -> str:
    return path.relative_to(folder).with_suffix("").as_posix().lower()


def _by_stem(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """Files of ``folder`` by lower-case relative stem, and by that stem less a ``_label``-like suffix."""
    found: dict[str, Path] = {}
    for path in _files(folder, exts):
        key = _stem_key(path, folder)
        found.setdefault(key, path)
        found.setdefault(_LABEL_SUFFIX.sub("", key), path)
    return found


def pair_files(image_dir: Path, ann_dir: Path, ann_exts: tuple[str, ...]
               ) -> tuple[list[tuple[str, Path, Path]], list[dict[str, str]]]:
    """Images in ``image_dir`` matched to annotations in ``ann_dir`` by relative stem.

    Returns ``[(relative stem, image, annotation)]`` in sorted order and the failures:
    images without an annotation, annotations without an image, two images with one stem.
    An annotation stem may carry a suffix such as ``_label`` or ``_mask``.
    """
    anns = _by_stem(ann_dir, ann_exts)
    images = [p for p in _files(image_dir, IMAGE_EXTENSIONS)
              if p.suffix.lower() not in ann_exts or image_dir != ann_dir]
    pairs, failed, used, seen = [], [], set(), {}
    for image in images:
        key = _stem_key(image, image_dir)
        if key in seen:
            failed.append({"source": str(image), "reason": f"another image has the same name stem ({seen[key].name}); "
                                                           "only the first is sharded, rename one to keep both."})
            continue
        seen[key] = image
        ann = anns.get(key)
        if ann is None:
            failed.append({"source": str(image), "reason": f"no annotation file {key}{'|'.join(ann_exts)} in "
                                                           f"{ann_dir}; add it or remove the image."})
            continue
        used.add(ann)
        pairs.append((image.relative_to(image_dir).with_suffix("").as_posix(), image, ann))
    for ann in sorted(set(anns.values()) - used):
        failed.append({"source": str(ann), "reason": f"no image with this name stem in {image_dir}; "
                                                     "add the image or remove the annotation."})
    return pairs, failed


# Per format: image folder names, annotation folder names, annotation extensions.
LAYOUTS = {
    "consep": (("images", "image", "imgs", "img", "rgb", "tiles"), ("labels", "label", "mat", "annotations"),
               (".mat",)),
    "nucls": (("rgb", "images", "image", "imgs", "img", "tiles"), ("csv", "annotations", "annotation", "labels"),
              (".csv",)),
    "voc": (("jpegimages", "images", "image", "imgs", "img"), ("annotations", "annotation", "xml", "labels"),
            (".xml",)),
    "labelmap": (("images", "image", "imgs", "img", "rgb", "tiles"),
                 ("labels", "label", "masks", "mask", "instances", "inst", "inst_maps", "instance_maps"),
                 (".png", ".tif", ".tiff", ".npy")),
}
_TYPE_DIRS = ("types", "type", "classes", "csv")


def pair_tiles(fmt: str, root: Path, *, images: Optional[str] = None, labels: Optional[str] = None,
               types: Optional[str] = None) -> tuple[list[tuple[str, str, str, Optional[str]]], list[dict]]:
    """``[(relative stem, image, annotation, type table or None)]`` of a tile format, and the failures.

    The relative stem is the group folder below ``root`` + the image's stem
    (``Train/train_1``). ``images``/``labels`` name the two folders instead of searching;
    ``types`` (labelmap) the folder of per-image CSVs, else a ``types/`` folder beside the
    image folder, else CSVs beside the label images.
    """
    image_dirs, ann_dirs, exts = LAYOUTS[fmt]
    if images or labels:
        groups = [(Path(images or root), Path(labels or root))]
        for folder in groups[0]:
            if not folder.is_dir():
                raise MissingInput(f"Folder {folder} does not exist; check --images/--labels.")
    else:
        groups = find_groups(root, image_dirs, ann_dirs)
    plan, failed = [], []
    for image_dir, ann_dir in groups:
        pairs, bad = pair_files(image_dir, ann_dir, exts)
        failed += bad
        tables = _type_files(image_dir, ann_dir, types) if fmt == "labelmap" else {}
        inside = image_dir != root and image_dir.parent.is_relative_to(root)
        prefix = image_dir.parent.relative_to(root).as_posix() if inside else "."
        for stem, image, annotation in pairs:
            table = tables.get(stem.lower())
            plan.append((stem if prefix == "." else f"{prefix}/{stem}", str(image), str(annotation),
                         str(table) if table else None))
    return plan, failed


def _type_files(image_dir: Path, ann_dir: Path, types: Optional[str]) -> dict[str, Path]:
    """Type tables (CSV) by lower-case relative stem, as ``pair_files`` matches them to images."""
    folder = Path(types) if types else next(
        (p for p in sorted(image_dir.parent.iterdir()) if p.is_dir() and p.name.lower() in _TYPE_DIRS), ann_dir)
    if not folder.is_dir():
        raise MissingInput(f"Folder {folder} does not exist; check --types.")
    return _by_stem(folder, (".csv",))


def find_pannuke(root: Path) -> tuple[list[tuple[str, str, Optional[str]]], list[dict[str, str]]]:
    """``[(images.npy, masks.npy, types.npy or None)]`` below ``root``, and the images without masks.

    Masks are looked for beside the images, then at the same path with an ``images``
    folder replaced by ``masks`` (PanNuke's ``Fold 1/images/fold1`` + ``Fold 1/masks/fold1``).
    """
    found, failed = [], []
    for images in sorted(root.rglob("images.npy")):
        candidates = [images.with_name("masks.npy")]
        parts = images.relative_to(root).parts
        for i, part in enumerate(parts[:-1]):
            if part.lower() in ("images", "image", "imgs"):
                for name in ("masks", "Masks", "mask", "Mask"):
                    candidates.append(root.joinpath(*parts[:i], name, *parts[i + 1:-1], "masks.npy"))
        masks = next((c for c in candidates if c.is_file()), None)
        if masks is None:
            failed.append({"source": str(images), "reason": "no masks.npy beside it or under a 'masks' folder in "
                                                            "the same place; put the PanNuke masks there."})
            continue
        types = images.with_name("types.npy")
        found.append((str(images), str(masks), str(types) if types.is_file() else None))
    return found, failed
