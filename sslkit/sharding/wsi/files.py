"""Which files are slides, and the id each slide gets in sample keys and the manifest.

    paths, failed = find_slides(["slides/", "@more.txt", "a.svs"])   # folders, list files, files
    ids = slide_ids(paths)                                           # unique, key-safe, stable
"""

from __future__ import annotations

import os
from pathlib import Path

from sslkit.errors import MissingInput
from sslkit.sharding.core.source import safe_id, unique_ids

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")


def find_slides(items: list[str], *, recursive: bool = False) -> tuple[list[str], list[dict]]:
    """Slide paths from files, folders (their slide files, sorted) and ``@list.txt`` files.

    Returns (paths without repeats, failed): missing entries of a list file are recorded as
    failed; a missing path given directly, or a folder without slides, raises FileNotFoundError.
    """
    paths: list[str] = []
    failed: list[dict] = []
    for item in items:
        if item.startswith("@"):
            listed = Path(item[1:])
            if not listed.is_file():
                raise MissingInput(f"Slide list {listed} does not exist; give a text file with one path a line.")
            for line in listed.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                path = Path(line) if Path(line).is_absolute() else listed.parent / line
                if path.is_file():
                    paths.append(str(path))
                else:
                    failed.append({"source": str(path), "reason": f"listed in {listed} but not a file; fix the list."})
        elif os.path.isdir(item):
            pattern = "**/*" if recursive else "*"
            found = sorted(str(p) for p in Path(item).glob(pattern)
                           if p.suffix.lower() in SLIDE_EXTENSIONS and p.is_file())
            if not found:
                raise MissingInput(f"Folder {item} holds no slide files ({', '.join(SLIDE_EXTENSIONS)}); "
                                        "give slide files or a folder of them" + ("." if recursive else
                                                                                  ", or add --recursive."))
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise MissingInput(f"Slide {item} does not exist; check the path.")
    seen: set[str] = set()
    unique = [p for p in paths if not (os.path.abspath(p) in seen or seen.add(os.path.abspath(p)))]
    return unique, failed


def _slide_id(text: str) -> str:
    """safe_id of ``text``, never "_" (a name of unsafe characters only): "slide" instead, so
    every id starts with [A-Za-z0-9-] and ``f"{id}_{x}_{y}"`` is a key as safe_id leaves it."""
    name = safe_id(text)
    return "slide" if name == "_" else name


def slide_ids(paths: list[str]) -> list[str]:
    """One id per slide: safe_id of the file stem ("slide" when nothing of it is safe). Slides
    whose stems collide are all named with their parent folders (as few as tell them apart),
    else also with the suffix, else numbered -2, -3 in input order (``unique_ids``); never
    equal to another slide's id."""
    ids = [_slide_id(Path(p).stem) for p in paths]
    groups: dict[str, list[int]] = {}
    for i, uid in enumerate(ids):
        groups.setdefault(uid, []).append(i)
    taken = {uid for uid, members in groups.items() if len(members) == 1}
    for members in (g for g in groups.values() if len(g) > 1):
        parts = [Path(os.path.abspath(paths[i])).parts[:-1] for i in members]
        depth = max(len(p) for p in parts)
        tries = [(d, False) for d in range(1, depth + 1)] + [(d, True) for d in range(depth + 1)]
        for d, suffix in tries:
            names = [_slide_id("_".join(p[len(p) - d:] + ((Path(paths[i]).name if suffix else Path(paths[i]).stem),)))
                     for p, i in zip(parts, members)]
            if len(set(names)) == len(names) and not taken & set(names):
                break
        else:
            names = [ids[members[0]]] * len(members)  # numbered below
        for i, name in zip(members, names):
            ids[i] = name
        taken.update(names)
    return unique_ids(ids)


def slide_bytes(path: str) -> int:
    """File size; for MIRAX (.mrxs) also the files of its companion folder."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    companion = Path(path).with_suffix("")
    if Path(path).suffix.lower() == ".mrxs" and companion.is_dir():
        size += sum(f.stat().st_size for f in companion.iterdir() if f.is_file())
    return size
