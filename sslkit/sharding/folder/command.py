"""Image folders as shards: labels from class folders, a CSV or a regex; group-wise splits.

How files, labels, groups, classes and splits are worked out: ``sslkit.sharding.folder.plan``.
Images are padded to a square on the background (``--pad-value auto``: the median of the
border pixels) and resized to ``--size``, never stretched. A unit is a run of
``--unit-files`` consecutive files (path order, or CSV order).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sslkit.atomic import write_json
from sslkit.errors import MissingInput, UsageError
from sslkit.sharding.core.imaging import IMAGE_EXTENSIONS, border_value, pad_to_square, read_image, resize
from sslkit.sharding.core.source import Progress, Sample, Unit
from sslkit.sharding.core.splits import add_split_args, default_names, list_arg, split_from_args
from sslkit.sharding.core.stain import StainNormalizer, add_stain_args, stain_from_args
from sslkit.sharding.folder.plan import FolderPlan, Item, plan_folder, report_lines, split_plan

INVERT = ("no", "yes", "auto")


def _check_options(size: int, channels: int, pad_value: int | str, unit_files: int, invert: str = "no") -> None:
    if invert not in INVERT:
        raise UsageError(f"--invert must be one of {', '.join(INVERT)}, got {invert!r}.")
    if size <= 0 or unit_files <= 0:
        raise UsageError(f"--size ({size}) and --unit-files ({unit_files}) must be positive; fix them.")
    if channels not in (1, 3):
        raise UsageError(f"--channels must be 1 or 3, got {channels}; pick one.")
    if pad_value != "auto" and not (isinstance(pad_value, int) and 0 <= pad_value <= 255):
        raise UsageError(f"--pad-value must be 'auto' or 0..255, got {pad_value!r}; fix it.")


class FolderSource:
    """A planned image folder (or one split of it) as a Source: units of ``unit_files`` images.

    Workers get the files of a unit in its payload; the full item list stays in the parent
    (it is not pickled), so a million files cost one list, not one per worker.
    """

    kind = "folder"
    encode = "png"
    quality = 95
    handles_skip = False
    unit_noun, sample_noun = "chunk", "image"

    def __init__(self, plan: FolderPlan, *, size: int, channels: int = 3, pad_value: int | str = "auto",
                 unit_files: int = 256, invert: str = "no", stain: Optional[StainNormalizer] = None) -> None:
        _check_options(size, channels, pad_value, unit_files, invert)
        if stain is not None and channels != 3:
            raise UsageError("--stain-normalize works on RGB images; drop it or use --channels 3.")
        self.stain = stain
        self.root, self.classes, self.failed = plan.root, plan.classes, list(plan.failed)
        self.size, self.channels, self.pad_value, self.unit_files = size, channels, pad_value, unit_files
        self.invert = invert
        self._items: Optional[list[Item]] = plan.items
        digest = hashlib.sha256()
        for item in plan.items:
            digest.update("\t".join(item).encode("utf-8", "surrogateescape") + b"\n")
        self._params = {**plan.settings, "root": plan.root, "classes": plan.classes, "size": size,
                        "channels": channels, "pad_value": pad_value, "unit_files": unit_files,
                        "files": len(plan.items), "files_sha256": digest.hexdigest()}
        if invert != "no":  # recorded only when used: folders sharded before the option resume as they were
            self._params["invert"] = invert
        self._params.update(stain.params if stain is not None else {})
        self._index: Optional[dict[str, int]] = (None if plan.classes is None else
                                                  {name: i for i, name in enumerate(plan.classes)})

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_items": None}

    def params(self) -> dict:
        return dict(self._params)

    def units(self) -> list[Unit]:
        if self._items is None:
            raise RuntimeError("FolderSource.units() must run in the process that built the source.")
        step = self.unit_files
        chunks = (self._items[i:i + step] for i in range(0, len(self._items), step))
        return [Unit(id=f"files-{n:06d}", path=os.path.join(self.root, chunk[0][0]), cost=float(len(chunk)),
                     payload=chunk) for n, chunk in enumerate(chunks)]

    def produce(self, unit: Unit, *, skip: int, progress: Progress) -> Iterator[Sample]:
        """Decode, pad to a square, resize; a file that does not decode is recorded and skipped."""
        progress.total(len(unit.payload))
        progress.info(files=len(unit.payload), first=unit.payload[0][0], last=unit.payload[-1][0])
        kept = 0
        for rel, key, label, group in unit.payload:
            path = os.path.join(self.root, rel)
            try:
                image, meta = self.load(path)
            except Exception as exc:  # noqa: BLE001 - any decoder error: record the file, go on
                progress.fail(path, f"cannot be decoded ({type(exc).__name__}: {exc}); replace or remove the file")
                progress.advance(1)
                continue
            if self.stain is not None:
                kept += not meta["stain_normalized"]
                progress.info(stain_kept=kept)
            index = None if self._index is None else self._index[label]
            yield Sample(key, image, index, {"path": rel, "label": label or None, "group": group, **meta})

    def load(self, path: str) -> tuple[np.ndarray, dict]:
        """(image, info) of one file: image (size, size[, 3]) uint8, inverted where ``invert`` says, padded to a
        square on the background, then resized; info {"height", "width"} of the file as decoded, whether it
        was "inverted" (with ``invert`` on) and the "pad" value used."""
        alpha_bg = 255 if self.pad_value == "auto" else self.pad_value
        image = read_image(path, channels=self.channels, background=alpha_bg)
        height, width = image.shape[:2]
        inverted = self.invert == "yes" or (self.invert == "auto" and bright_on_dark(image))
        if inverted:
            image = 255 - image
        info = {"height": height, "width": width, **({"inverted": inverted} if self.invert != "no" else {})}
        if self.stain is not None:
            image, info["stain_normalized"] = self.stain(image)
        value = border_value(image) if self.pad_value == "auto" else self.pad_value
        image = resize(pad_to_square(image, value), (self.size, self.size))
        return image, {**info, "pad": value}


def bright_on_dark(image: np.ndarray) -> bool:
    """Whether an image's background (the median of its border, ``border_value``) is dark: below mid-grey,
    as in fluorescence (Q-banding, DAPI), where the objects are the bright part."""
    return float(np.mean(border_value(image))) < 127.5


def shard_folder(root: str | Path, out: str | Path, *, size: int, channels: int = 3, pad_value: int | str = "auto",
                 csv_path: Optional[str] = None, label_regex: Optional[str] = None,
                 group_regex: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                 min_class_count: int = 5, unlabeled: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, split: Optional[Sequence[float]] = None,
                 split_names: Optional[Sequence[str]] = None, seed: int = 0, unit_files: int = 256,
                 invert: str = "no", stain: Optional[StainNormalizer] = None,
                 **run_kwargs: Any) -> dict[str, dict]:
    """Plan, split by group, print the report, shard each split with ``run_source``: {out folder: summary}.

    ``OUT/splits.json`` is written only after every split's ``run_source`` has accepted the
    folder's recorded settings and run, so a refused run (another ``seed``) leaves it as it was.
    """
    from sslkit.sharding.core.runner import run_source

    _check_options(size, channels, pad_value, unit_files, invert)
    plan = plan_folder(root, csv_path=csv_path, label_regex=label_regex, group_regex=group_regex,
                       classes=classes, min_class_count=min_class_count, unlabeled=unlabeled,
                       extensions=extensions)
    parts, audit, out = {"": plan}, None, Path(out)
    if split is not None:
        names = split_names or default_names(len(split))
        parts, audit = split_plan(plan, fractions=split, names=names, seed=seed)
    print("\n".join(report_lines(plan, audit)))
    summaries = {str(out / name): run_source(FolderSource(part, size=size, channels=channels, pad_value=pad_value,
                                                          unit_files=unit_files, invert=invert, stain=stain),
                                             out / name,
                                             **run_kwargs)
                 for name, part in parts.items()}
    if audit is not None:
        write_json(out / "splits.json", audit)
    return summaries


def _cmd_folder(args: argparse.Namespace) -> None:
    from sslkit.sharding.core.runner import exit_on_failures, runner_kwargs

    split, split_names = split_from_args(args)
    pad = int(args.pad_value) if args.pad_value.isdigit() else args.pad_value
    if args.classes and args.classes_file:
        raise UsageError("Give --classes or --classes-file, not both.")
    classes = list_arg(args.classes)
    if args.classes_file:
        if not os.path.isfile(args.classes_file):
            raise MissingInput(f"Classes file {args.classes_file} does not exist; give one name per line.")
        lines = Path(args.classes_file).read_text(encoding="utf-8-sig").splitlines()
        classes = [c.strip() for c in lines if c.strip() and not c.lstrip().startswith("#")]
    summaries = shard_folder(
        args.root, args.out, size=args.size, channels=args.channels, pad_value=pad, csv_path=args.csv,
        label_regex=args.label_regex, group_regex=args.group_regex, classes=classes,
        min_class_count=args.min_class_count, unlabeled=args.unlabeled,
        extensions=list_arg(args.extensions) or IMAGE_EXTENSIONS, split=split,
        split_names=split_names, seed=args.seed, unit_files=args.unit_files, invert=args.invert,
        stain=stain_from_args(args, channels=args.channels),
        **runner_kwargs(args), command=shlex.join(sys.argv))
    exit_on_failures(list(summaries.values()), args)


_EPILOG = """examples:
  sslkit shard folder data/cells --out shards/cells --size 64                 # class sub-folders
  sslkit shard folder data/imgs --csv labels.csv --out shards/x --size 96 --split 0.8,0.2
  sslkit shard folder chromosomes --out shards/chrom --size 64 --channels 1 \\
      --label-regex 'clase(\\d+)' --group-regex '^([^/]+)/' --split 0.8,0.1,0.1
"""


def add_parser(shard_sub: Any) -> argparse.ArgumentParser:
    """Add ``sslkit shard folder`` to the ``sslkit shard`` sub-parsers."""
    from sslkit.sharding.core.runner import add_runner_args

    p = shard_sub.add_parser("folder", help="image folders: class sub-folders, a CSV or regex labels, "
                             "group-wise splits", description=__doc__, epilog=_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder that holds the images")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per split with --split)")
    p.add_argument("--size", type=int, required=True, help="side of the square output images, in pixels")
    p.add_argument("--label-regex", help="label = named group 'label' / first group of this regex on the path")
    p.add_argument("--csv", help="path,label[,group] list; paths relative to ROOT or to the CSV")
    p.add_argument("--unlabeled", action="store_true", help="no labels: every image under ROOT, unlabelled")
    p.add_argument("--classes", help="expected classes in index order, a,b,c; other labels are reported")
    p.add_argument("--classes-file", help="expected classes, one per line")
    p.add_argument("--min-class-count", type=int, default=5,
                   help="without --classes, rarer labels (also < 1/10 of the median class) are strays (default 5)")
    add_split_args(p, group_help="group (patient, case) = named group 'group' / first group on the path")
    add_stain_args(p)
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 = grayscale, 3 = RGB (default)")
    p.add_argument("--pad-value", default="auto", help="square padding: auto (border median) or 0..255")
    p.add_argument("--invert", choices=INVERT, default="no",
                   help="bright objects on a dark background (fluorescence, Q-banding) made dark on light: yes for "
                        "every image, auto for those whose border is darker than mid-grey (default no)")
    p.add_argument("--extensions", help="image suffixes to take, folder walk only (ignored with --csv; "
                   f"default {','.join(IMAGE_EXTENSIONS)})")
    p.add_argument("--unit-files", type=int, default=256, help="files per unit of work (default 256)")
    add_runner_args(p)
    p.set_defaults(fn=_cmd_folder)
    return p


__all__ = ["FolderSource", "add_parser", "shard_folder"]
