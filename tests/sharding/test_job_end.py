"""How a sharding command ends: one that dies, by any signal, takes every process it started with it
(its fork server, worker processes and resource tracker); one whose inputs failed exits with status 3
after writing everything else.

The commands run as a scheduler or CI would run them: `python -m sslkit shard ...` with stdout and
stderr on pipes. Every process they start carries a mark in its environment, so a survivor is found
wherever it went in the process tree (an orphan is handed to init)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import tifffile
from PIL import Image
from processes import describe, kill_all, marked, marked_env, new_mark, wait_until_gone

from sslkit.sharding.core.journal import JOURNAL_DIR
from sslkit.sharding.core.runner import FAILED_INPUTS_EXIT

REPO = Path(__file__).resolve().parents[2]
CONSEP = REPO.parent / "shared" / "data" / "consep-tiles" / "Train"


def consep_tiles(root: Path, *, tiles: int, side: int = 256, nuclei: int = 160, seed: int = 0) -> Path:
    """A CoNSeP-layout folder: Images/*.png and Labels/*.mat (inst_map, inst_type) of square nuclei."""
    rng = np.random.default_rng(seed)
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    for t in range(tiles):
        inst = np.zeros((side, side), np.int32)
        for i in range(nuclei):
            y, x = rng.integers(4, side - 12, size=2)
            inst[y:y + 8, x:x + 8] = i + 1
        types = rng.integers(1, 8, size=(np.unique(inst).size - 1, 1))
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / "Images" / f"t{t:03d}.png")
        sio.savemat(root / "Labels" / f"t{t:03d}.mat", {"inst_map": inst, "inst_type": types})
    return root


def slides(root: Path, *, count: int, side: int = 2048, seed: int = 0) -> Path:
    """Pyramidal TIFFs at 0.5 um/px (one page per level), a noisy pink tissue block on a white glass."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    image = np.full((side, side, 3), 245, np.uint8)
    inner = side * 3 // 4
    image[side // 8:side // 8 + inner, side // 8:side // 8 + inner] = np.clip(
        np.array([200, 80, 150]) + rng.integers(-20, 20, (inner, inner, 3)), 0, 255)
    with tifffile.TiffWriter(root / "slide0.tif") as tif:
        for i, k in enumerate((1, 4)):
            tif.write(image[::k, ::k], tile=(128, 128), photometric="rgb", compression="zlib",
                      subfiletype=1 if i else 0, resolution=(1e4 / (0.5 * k),) * 2, resolutionunit="CENTIMETER",
                      metadata=None)
    for s in range(1, count):  # the same bytes under other names: other slides to the importer
        os.link(root / "slide0.tif", root / f"slide{s}.tif")
    return root


def _cells_args(tmp: Path) -> list[str]:
    return ["cells", "--format", "consep", "--input", str(consep_tiles(tmp / "in", tiles=160)), "--window-scale", "2",
            "--size", "32"]


def _wsi_args(tmp: Path) -> list[str]:
    pytest.importorskip("openslide")
    return ["wsi", str(slides(tmp / "in", count=16)), "--mpp", "0.5", "--tile", "64"]


def _real_consep_args(tmp: Path) -> list[str]:
    if not CONSEP.is_dir():
        pytest.skip("shared data not present")
    return ["cells", "--format", "consep", "--input", str(CONSEP), "--window-scale", "2", "--size", "32"]


JOBS = {"cells": _cells_args, "wsi": _wsi_args, "cells-real-consep": _real_consep_args}


# `python -m sslkit ARGS` with Ctrl-C's usual effect: a shell that starts a job in the background (CI
# runners, `cmd &`) makes it ignore SIGINT, and Python keeps that; a user's terminal does not.
AS_FROM_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "sys.argv[0] = 'sslkit'; runpy.run_module('sslkit', run_name='__main__')")


def _journaled_shards(out: Path) -> int:
    return sum(line.count('"type": "shard"') for p in (out / JOURNAL_DIR).glob("journal-*.jsonl")
               for line in p.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("job, sig", [pytest.param(job, sig, id=f"{job}-{sig.name}") for job, sig in [
    ("cells", signal.SIGKILL), ("wsi", signal.SIGKILL), ("cells-real-consep", signal.SIGKILL),
    ("cells", signal.SIGTERM), ("cells", signal.SIGINT)]])
def test_a_killed_shard_command_leaves_no_process(tmp_path, job, sig):
    out, mark = tmp_path / "out", new_mark()
    command = [sys.executable, "-c", AS_FROM_A_TERMINAL, "shard", *JOBS[job](tmp_path), "--out", str(out),
               "--workers", "2", "--shard-size", "200"]
    proc = subprocess.Popen(command, cwd=REPO, env=marked_env(mark), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _journaled_shards(out) < 1 or len(marked(mark)) < 4:  # the job, its fork server and 2 workers
            assert proc.poll() is None, "the job ended before it could be killed; give it more work"
            assert time.monotonic() < deadline, f"no shard after 120 s:\n{describe(marked(mark))}"
            time.sleep(0.02)
        helpers = [p for p in marked(mark) if p.pid != proc.pid]
        assert len(helpers) >= 3, describe(helpers)  # what must not survive is really there
        assert proc.poll() is None, "the job ended before it could be killed; give it more work"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        left = wait_until_gone(lambda: marked(mark), timeout=10)
        assert not left, f"still running 10 s after the job died of {sig.name}:\n{describe(left)}"
        assert not (out / "manifest.json").exists()  # it really was cut short
        proc.communicate(timeout=10)  # nobody holds its pipes any more
    finally:
        proc.kill()
        kill_all(marked(mark))
        proc.communicate()


def _shard(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslkit", "shard", *args, "--workers", "0", "--no-progress"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_failed_inputs_give_exit_status_3_after_everything_else_is_written(tmp_path):
    root = consep_tiles(tmp_path / "in", tiles=3, nuclei=5)
    (root / "Images" / "t001.png").write_bytes(b"not a png")
    args = ["cells", "--format", "consep", "--input", str(root), "--out", str(tmp_path / "out"), "--size", "16"]
    first = _shard(args, tmp_path)
    assert first.returncode == FAILED_INPUTS_EXIT == 3, first.stderr
    assert "1 input failed" in first.stderr and "--allow-failures" in first.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["status"] for s in manifest["sources"]] == ["done", "failed", "done"]
    assert manifest["num_samples"] == 10 and "t001.png" in manifest["failed"][0]["source"]
    again = _shard(args, tmp_path)  # the failed tile is retried, fails again: still 3, nothing lost
    assert again.returncode == 3 and json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 10
    allowed = _shard([*args, "--allow-failures"], tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    (root / "Images" / "t001.png").unlink()
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(root / "Images" / "t001.png")  # mended
    mended = _shard(args, tmp_path)
    assert mended.returncode == 0, mended.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 15


def test_a_slide_that_does_not_open_gives_exit_status_3(tmp_path):
    pytest.importorskip("openslide")
    root = slides(tmp_path / "in", count=1, side=512)
    (root / "notes.svs").write_text("not a slide")
    args = ["wsi", str(root), "--out", str(tmp_path / "out"), "--mpp", "0.5", "--tile", "128"]
    result = _shard(args, tmp_path)
    assert result.returncode == 3, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0 and [Path(f["source"]).name for f in manifest["failed"]] == ["notes.svs"]
    assert _shard([*args, "--allow-failures"], tmp_path).returncode == 0


def test_folder_with_an_undecodable_image_exits_3_unless_failures_are_allowed(tmp_path, capsys):
    from sslkit.cli import main

    for i in range(4):
        (tmp_path / "in" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 4), 10 * i, np.uint8)).save(tmp_path / "in" / "a" / f"img{i}.png")
    (tmp_path / "in" / "a" / "img9.png").write_bytes(b"\x89PNG but no more")
    args = ["shard", "folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "6", "--workers", "0",
            "--no-progress", "--min-class-count", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 3 and "1 input failed" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and [Path(f["source"]).name for f in manifest["failed"]] == ["img9.png"]
    main([*args, "--allow-failures"])  # returns: exit status 0
