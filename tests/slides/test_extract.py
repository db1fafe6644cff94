"""sslkit extract: feature bags read back with h5py against the tile plan and against `sslkit embed` of
the same tiles, --shards against --slides, 2 ranks against 1, kill -9 then resume, damaged slides,
the three kinds of encoder, and the files' layout and attributes.

Slides are small pyramidal TIFFs written with tifffile (textured "tissue" rectangles on white
glass); the encoder is the committed tiny CCRL run (tests/fixtures/run-0.1-ccrl, 32 px input).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
import tifffile
import torch

pytest.importorskip("openslide")

from processes import wait_until_gone  # noqa: E402

from sslkit.cli import main  # noqa: E402
from sslkit.errors import MissingInput, UsageError  # noqa: E402
from sslkit.sharding.wsi.command import plan_tiles  # noqa: E402
from sslkit.sharding.wsi.slides import open_slide  # noqa: E402
from sslkit.slides.bags import BAG_ATTRS, load_bag, write_bag  # noqa: E402
from sslkit.slides.encoders import load_encoder  # noqa: E402
from sslkit.slides.extract import extract_bags  # noqa: E402
from sslkit.slides.tiles import ShardTiles, SlideFiles  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "tests" / "fixtures" / "run-0.1-ccrl"
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
TILE, MPP = 32, 1.0  # 32 target px at 1 um/px: the run's input size, so the transform does not resize
FLAGS = ["--mpp", str(MPP), "--tile", str(TILE)]
# (name, level-0 um/px, tissue rectangles in level-0 px). At 0.4 um/px the 1 um/px tiles come from
# level 1 (0.8 um/px) shrunk by 1.25; at 0.5 um/px level 1 is read as it is.
SLIDES = [("alpha", 0.5, [(64, 64, 448, 320)]), ("beta", 0.4, [(128, 96, 640, 480)]),
          ("gamma", 0.5, [(320, 192, 704, 576), (32, 448, 224, 608)])]


def shrink(img: np.ndarray, k: int) -> np.ndarray:
    h, w = img.shape[0] // k, img.shape[1] // k
    return np.rint(img[:h * k, :w * k].reshape(h, k, w, k, 3).mean(axis=(1, 3))).astype(np.uint8)


def tissue_image(rects: list, seed: int, size: tuple[int, int] = (640, 768)) -> np.ndarray:
    """White glass with pink rectangles whose shade varies smoothly and per pixel, so tiles differ."""
    rng = np.random.default_rng(seed)
    img = np.full((*size, 3), 255, np.uint8)
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    wave = 30 * np.sin(xx / 23.0 + seed) * np.cos(yy / 31.0)
    for x0, y0, x1, y1 in rects:
        base = np.array([200, 80, 150], np.float32) + wave[y0:y1, x0:x1, None] * np.array([1, -0.5, 0.6])
        img[y0:y1, x0:x1] = np.clip(base + rng.normal(0, 12, (y1 - y0, x1 - x0, 3)), 0, 255).astype(np.uint8)
    return img


def write_slide(path: Path, img: np.ndarray, mpp: float) -> Path:
    """A tiled pyramidal TIFF (levels 1, 2, 4 as reduced-resolution pages) with its resolution in cm."""
    with tifffile.TiffWriter(path) as tif:
        for i, k in enumerate((1, 2, 4)):
            tif.write(shrink(img, k), tile=(128, 128), photometric="rgb", compression="zlib", metadata=None,
                      subfiletype=1 if i else 0, resolution=(1e4 / (mpp * k),) * 2, resolutionunit="CENTIMETER")
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for seed, (name, mpp, rects) in enumerate(SLIDES):
        write_slide(folder / f"{name}.tif", tissue_image(rects, seed), mpp)
    return folder


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(str(RUN), encoder="momentum")


@pytest.fixture(scope="module")
def reference(slides, encoder, tmp_path_factory) -> Path:
    """One uninterrupted single-process extraction of the slides, the baseline of several tests."""
    out = tmp_path_factory.mktemp("reference")
    extract_bags(encoder, SlideFiles([str(slides)], mpp=MPP, tile=TILE), out, batch_size=16, workers=1,
                 progress=False)
    return out


@pytest.fixture(scope="module")
def png_shards(slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "wsi"
    main(["shard", "wsi", str(slides), "--out", str(out), *FLAGS, "--encode", "png", "--workers", "0",
          "--no-progress"])
    return out


def plan_corners(path: Path) -> np.ndarray:
    """The level-0 corners ``plan_tiles`` keeps, sorted by (y, x): what a bag's coords must be."""
    slide = open_slide(str(path))
    try:
        plan, _, _ = plan_tiles(slide, mpp=MPP, tile=TILE, overlap=0, min_tissue=0.5)
        corners = np.array([plan.geometry.to_level0(x, y) for x, y in plan.tiles.tolist()], np.int64)
    finally:
        slide.close()
    return corners[np.lexsort((corners[:, 0], corners[:, 1]))]


def same_bags(a: Path, b: Path, names: list[str], *, same_path: bool = True) -> None:
    """Bags of the same names in ``a`` and ``b`` hold the same rows and attributes (the slide's path
    aside when the slides were copied)."""
    for name in names:
        fa, ca, attrs_a = load_bag(a / f"{name}.h5")
        fb, cb, attrs_b = load_bag(b / f"{name}.h5")
        np.testing.assert_array_equal(ca, cb)
        np.testing.assert_array_equal(fa, fb)
        if not same_path:
            attrs_a.pop("slide_path"), attrs_b.pop("slide_path")
        assert attrs_a == attrs_b


# ---------------------------------------------------------------- what a bag holds


def test_bags_hold_the_planned_tiles_and_the_embed_features(slides, reference, png_shards, tmp_path):
    main(["embed", str(RUN), "--shards", str(png_shards), "--out", str(tmp_path / "emb"), "--encoder", "momentum"])
    embedded = np.load(tmp_path / "emb" / "embeddings.npy")
    rows = {key: i for i, key in enumerate((tmp_path / "emb" / "keys.txt").read_text().split())}
    total = 0
    for name, mpp, _ in SLIDES:
        with h5py.File(reference / f"{name}.h5", "r") as f:
            features, coords = f["features"][()], f["coords"][()]
            assert features.dtype == np.float32 and coords.dtype == np.int64 and features.shape[1] == 32
            assert dict(f.attrs) == dict(f["coords"].attrs)
            attrs = {k: f.attrs[k] for k in BAG_ATTRS}
        expected = plan_corners(slides / f"{name}.tif")
        assert len(expected) > 20
        np.testing.assert_array_equal(coords, expected)
        assert attrs["patch_size"] == TILE and attrs["target_mpp"] == MPP and attrs["level0_mpp"] == mpp
        assert attrs["patch_size_level0"] == round(TILE * MPP / mpp)  # 64 at 0.5 um/px, 80 at 0.4
        assert attrs["slide_id"] == name and attrs["slide_path"] == str(slides / f"{name}.tif")
        assert attrs["feature_kind"] == "backbone" and "momentum encoder" in attrs["encoder"]
        assert attrs["encoder"].startswith(f"run {RUN}") and attrs["sslkit_version"]
        # the same tiles through `sslkit shard wsi --encode png` and `sslkit embed`
        wanted = [rows[f"{name}_{x}_{y}"] for x, y in coords.tolist()]
        np.testing.assert_allclose(features, embedded[wanted], rtol=0, atol=1e-5)
        total += len(coords)
    assert total == len(rows)  # every embedded tile is in a bag


def test_shards_give_the_slides_coords_and_features(slides, reference, png_shards, tmp_path):
    source = ShardTiles(png_shards)
    assert source.settings() == SlideFiles([str(slides)], mpp=MPP, tile=TILE).settings()
    summary = extract_bags(load_encoder(str(RUN), encoder="momentum"), source, tmp_path / "png", batch_size=16,
                           workers=2, progress=False)
    assert summary["slides_done"] == 3 and summary["manifest"]["source"] == "shards"
    for name, _, _ in SLIDES:
        f_slides, c_slides, a_slides = load_bag(reference / f"{name}.h5")
        f_png, c_png, a_png = load_bag(tmp_path / "png" / f"{name}.h5")
        np.testing.assert_array_equal(c_png, c_slides)
        np.testing.assert_allclose(f_png, f_slides, rtol=0, atol=1e-5)  # lossless tiles: the same features
        assert a_png == a_slides
    jpeg = tmp_path / "jpeg-shards"
    main(["shard", "wsi", str(slides / "beta.tif"), "--out", str(jpeg), *FLAGS, "--workers", "0", "--no-progress"])
    main(["extract", str(RUN), "--encoder", "momentum", "--shards", str(jpeg), "--out", str(tmp_path / "jpeg"),
          "--no-progress"])
    f_slides, c_slides, _ = load_bag(reference / "beta.h5")
    f_jpeg, c_jpeg, _ = load_bag(tmp_path / "jpeg" / "beta.h5")
    np.testing.assert_array_equal(c_jpeg, c_slides)
    cosine = np.sum(f_jpeg * f_slides, 1) / np.linalg.norm(f_jpeg, axis=1) / np.linalg.norm(f_slides, axis=1)
    assert cosine.min() > 0.98  # JPEG q90 moves the features a little, never to another tile's


def test_manifest_pt_files_and_resume_skips_done_slides(slides, reference, encoder, tmp_path):
    out = tmp_path / "bags"
    out.mkdir()
    shutil.copy(reference / "alpha.h5", out / "alpha.h5")  # a finished slide from an earlier run
    source = SlideFiles([str(slides)], mpp=MPP, tile=TILE)
    summary = extract_bags(encoder, source, out, batch_size=16, workers=0, pt=True, progress=False)
    assert (summary["skipped"], summary["slides_done"]) == (1, 2)
    manifest = summary["manifest"]
    assert manifest["done"] == 3 and manifest["failed"] == 0 and manifest["encoder"] == encoder.identity
    assert manifest["settings"]["tile"] == TILE and manifest["settings"]["mpp"] == MPP
    for name, _, _ in SLIDES:
        entry = manifest["slides"][name]
        features, _, _ = load_bag(out / f"{name}.h5")
        assert entry["status"] == "done" and entry["tiles"] == len(features) and entry["bag"] == f"{name}.h5"
        # alpha was skipped: its .pt is written from its bag
        np.testing.assert_array_equal(torch.load(out / "pt_files" / f"{name}.pt").numpy(), features)
    same_bags(reference, out, [name for name, _, _ in SLIDES])
    again = extract_bags(encoder, source, out, batch_size=16, workers=0, progress=False)
    assert again["skipped"] == 3 and again["tiles"] == 0 and again["manifest"]["slides"] == manifest["slides"]
    with pytest.raises(UsageError, match="other settings.*tile: 32 before, 48 now"):
        extract_bags(encoder, SlideFiles([str(slides)], mpp=MPP, tile=48), out, workers=0, progress=False)
    with pytest.raises(UsageError, match="encoder_variant: 'momentum encoder' before, 'query encoder' now"):
        extract_bags(load_encoder(str(RUN), encoder="query"), source, out, workers=0, progress=False)
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["alpha.h5", "beta.h5", "gamma.h5", "manifest.json", "pt_files"]


# ---------------------------------------------------------------- damaged slides


def damage_tile(path: Path, level: int, index: int) -> None:
    """Overwrite one stored tile of ``level`` with bytes that do not decode."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        offset, size = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x55" * size)


def test_damaged_slides_are_recorded_and_the_rest_extracted(slides, reference, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("alpha", "gamma"):
        shutil.copy(slides / f"{name}.tif", folder / f"{name}.tif")
    data = (slides / "beta.tif").read_bytes()
    (folder / "cut.tif").write_bytes(data[:len(data) // 3])  # a copy cut short
    (folder / "garbage.svs").write_bytes(np.random.default_rng(0).bytes(50_000))
    write_slide(folder / "blank.tif", np.full((640, 768, 3), 250, np.uint8), 0.5)
    shutil.copy(slides / "beta.tif", folder / "torn.tif")
    damage_tile(folder / "torn.tif", 1, 5)  # level 1 is read for the tiles; tile 5 holds tissue
    listed = tmp_path / "more.txt"
    listed.write_text("slides/alpha.tif\nslides/gone.svs\n")  # alpha once more (taken once), and a missing file
    out = tmp_path / "bags"
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(RUN), "--encoder", "momentum", "--slides", str(folder), f"@{listed}", "--out", str(out),
              *FLAGS, "--batch-size", "4", "--workers", "1", "--no-progress"])
    assert exit_info.value.code == 3
    manifest = json.loads((out / "manifest.json").read_text())
    status = {sid: entry["status"] for sid, entry in manifest["slides"].items()}
    assert status == {"alpha": "done", "gamma": "done", "blank": "failed", "cut": "failed", "garbage": "failed",
                      "torn": "failed"}
    errors = {sid: entry.get("error", "") for sid, entry in manifest["slides"].items()}
    assert "no tissue" in errors["blank"] and "Cannot open" in errors["garbage"]
    assert "Reading" in errors["torn"] and "damaged" in errors["torn"]
    assert all(errors[sid].endswith(".") and errors[sid].count("\n") == 0 for sid in ("blank", "cut", "garbage"))
    assert [item["source"] for item in manifest["failed_inputs"]] == [str(tmp_path / "slides" / "gone.svs")]
    assert sorted(p.name for p in out.glob("*.h5")) == ["alpha.h5", "gamma.h5"]
    same_bags(reference, out, ["alpha", "gamma"], same_path=False)
    assert "failed: " in capsys.readouterr().out


def test_command_line_refusals(slides, png_shards, tmp_path):
    with pytest.raises(UsageError, match="--mpp, --tile tile slides"):
        from sslkit.cli import parse_args
        from sslkit.slides.extract import build_source

        build_source(parse_args(["extract", str(RUN), "--shards", str(png_shards), "--out", "x", *FLAGS]))
    with pytest.raises(UsageError, match="not written by `sslkit shard wsi`|holds no manifest"):
        ShardTiles(tmp_path)
    with pytest.raises(UsageError, match="--weights FILE"):
        load_encoder("timm:resnet18")
    with pytest.raises(MissingInput, match="not a file"):
        load_encoder("timm:resnet18", weights=str(tmp_path / "nothing.pth"))
    with pytest.raises(UsageError, match="belong to a timm model"):
        load_encoder(str(RUN), weights="w.pth")


# ---------------------------------------------------------------- encoders


def test_exported_and_timm_encoders(slides, reference, tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.data import resolve_model_data_config

    from sslkit.export import export_run

    exported = tmp_path / "backbone.safetensors"
    export_run(RUN, exported, encoder="momentum")
    source = SlideFiles([str(slides / "gamma.tif")], mpp=MPP, tile=TILE)
    extract_bags(load_encoder(str(exported)), source, tmp_path / "exported", workers=0, progress=False)
    f_run, c_run, _ = load_bag(reference / "gamma.h5")
    f_exp, c_exp, attrs = load_bag(tmp_path / "exported" / "gamma.h5")
    np.testing.assert_array_equal(c_exp, c_run)
    np.testing.assert_allclose(f_exp, f_run, rtol=0, atol=1e-5)  # the file holds the run's momentum backbone
    assert attrs["encoder"].startswith(f"{exported} (preact_resnet18")

    # timm: a resnet with its own 48 px input and ImageNet normalisation, weights from a local file
    model = timm.create_model("resnet10t", num_classes=0, pretrained=False).eval()
    weights = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    enc = load_encoder("timm:resnet10t", weights=str(weights), input_size=48)
    extract_bags(enc, source, tmp_path / "timm", workers=0, progress=False)
    f_timm, c_timm, attrs = load_bag(tmp_path / "timm" / "gamma.h5")
    np.testing.assert_array_equal(c_timm, c_run)
    assert attrs["encoder"].startswith(f"timm resnet10t weights {weights} (sha256 ")
    config = resolve_model_data_config(model)
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    slide = open_slide(str(slides / "gamma.tif"))
    try:  # the first tile by hand: read at level 1 (1 um/px), resized to 48 px, normalised, embedded
        from PIL import Image

        x, y = (int(v) for v in c_run[0])
        pixels = slide.read(1, x // 2, y // 2, TILE, TILE)
    finally:
        slide.close()
    resized = Image.fromarray(pixels).resize((48, 48), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        by_hand = model((tensor - mean) / std).numpy()
    assert config["interpolation"] == "bicubic"
    np.testing.assert_allclose(f_timm[0], by_hand[0], rtol=0, atol=2e-3 * np.abs(by_hand).max())
    other = tmp_path / "other.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("layer4")}, str(other))
    with pytest.raises(UsageError, match=r"weights missing \(layer4"):
        load_encoder("timm:resnet10t", weights=str(other))


def test_write_bag_is_atomic_and_load_bag_reads_it_back(tmp_path):
    features, coords = np.arange(12, dtype=np.float64).reshape(3, 4), np.array([[0, 5], [7, 5], [0, 9]])
    path = write_bag(tmp_path / "s.h5", features, coords, {"patch_size": 32, "slide_id": "s", "target_mpp": 0.5})
    got_f, got_c, attrs = load_bag(path)
    assert got_f.dtype == np.float32 and got_c.dtype == np.int64
    np.testing.assert_array_equal(got_f, features)
    np.testing.assert_array_equal(got_c, coords)
    assert attrs == {"patch_size": 32, "slide_id": "s", "target_mpp": 0.5}
    with pytest.raises(TypeError):  # an attribute h5py cannot store: the old file stays, no temporary left
        write_bag(path, features[:1], coords[:1], {"patch_size": {"not": "storable"}})
    with pytest.raises(ValueError, match="same N"):
        write_bag(path, features, coords[:2], {})
    assert len(load_bag(path)[0]) == 3 and [p.name for p in tmp_path.iterdir()] == ["s.h5"]


@pytest.mark.skipif(not CMU.is_file(), reason="the CMU-1-Small-Region slide is not available")
def test_real_slide(tmp_path):
    summary = extract_bags(load_encoder(str(RUN)), SlideFiles([str(CMU)], mpp=1.0, tile=64), tmp_path,
                           workers=1, progress=False)
    features, coords, attrs = load_bag(tmp_path / "CMU-1-Small-Region.h5")
    assert summary["slides_done"] == 1 and len(features) == len(coords) == summary["tiles"] > 100
    assert attrs["level0_mpp"] == 0.499 and attrs["patch_size_level0"] == 128  # 64 px at 1.0 / 0.499 um/px
    assert np.isfinite(features).all() and len(np.unique(features.round(4), axis=0)) == len(features)


# ---------------------------------------------------------------- ranks, kill -9


def _command(slides: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "sslkit", "extract", str(RUN), "--encoder", "momentum", "--slides", str(slides), "--out", str(out),
            *FLAGS, "--batch-size", "16", "--no-progress", *extra]


@pytest.mark.slow
def test_two_ranks_write_the_files_one_process_writes(slides, reference, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_command(slides, out, "--workers", "1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [name for name, _, _ in SLIDES]
    same_bags(reference, out, names)
    taken = [{json.loads(line).get("slide") for line in (out / ".extract" / f"rank-00{r}.jsonl").read_text()
              .splitlines()} - {None} for r in (0, 1)]
    assert not taken[0] & taken[1] and taken[0] | taken[1] == set(names) and all(taken)  # each slide once
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["done"] == 3 and sorted(r["rank"] for r in manifest["runs"]) == [0, 1]
    assert all(0.0 <= r["data_wait_share"] <= 1.0 for r in manifest["runs"])


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_files(slides, reference, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    names = []
    for copy in range(3):  # 9 slides, so a kill lands between the first bag and the last
        for name, _, _ in SLIDES:
            (folder / f"{name}-{copy}.tif").symlink_to(slides / f"{name}.tif")
            names.append(f"{name}-{copy}")
    out = tmp_path / "bags"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, *_command(folder, out, "--workers", "1")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def bags() -> int:  # finished bags; pathlib's glob also matches the hidden temporary files
        return sum(not p.name.startswith(".") for p in out.glob("*.h5"))

    deadline = time.monotonic() + 120
    while not bags() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    workers = psutil.Process(proc.pid).children(recursive=True)  # the DataLoader worker
    os.kill(proc.pid, signal.SIGKILL)  # the command alone: its worker must notice and end too
    proc.wait()
    left = wait_until_gone(lambda: [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE],
                           timeout=15)
    assert not left, f"{len(left)} DataLoader worker(s) outlived the killed command"
    before = bags()
    assert 1 <= before < len(names), "the kill did not land mid-collection"
    done = subprocess.run([sys.executable, *_command(folder, out, "--workers", "1")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{before} already done" in done.stdout
    for name in names:
        base = name.rsplit("-", 1)[0]
        fa, ca, attrs = load_bag(out / f"{name}.h5")
        fr, cr, ref_attrs = load_bag(reference / f"{base}.h5")
        np.testing.assert_array_equal(ca, cr)
        np.testing.assert_array_equal(fa, fr)
        assert attrs["slide_id"] == name and {k: v for k, v in attrs.items() if k not in ("slide_id", "slide_path")} \
            == {k: v for k, v in ref_attrs.items() if k not in ("slide_id", "slide_path")}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".extract") == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["done"] == len(names) and set(manifest["slides"]) == set(names)


def test_precision(slides, reference, encoder, tmp_path, monkeypatch):
    from sslkit.slides.extract import resolve_precision

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision("auto", cpu) == "no" and resolve_precision("auto", gpu) == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_precision("auto", gpu) == "no"
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    summary = extract_bags(encoder, SlideFiles([str(slides / "alpha.tif")], mpp=MPP, tile=TILE), tmp_path,
                           workers=0, precision="bf16", progress=False)
    assert summary["precision"] == "bf16" and summary["manifest"]["settings"]["precision"] == "bf16"
    f_bf16, coords, _ = load_bag(tmp_path / "alpha.h5")
    f_fp32, ref_coords, _ = load_bag(reference / "alpha.h5")
    np.testing.assert_array_equal(coords, ref_coords)
    assert f_bf16.dtype == np.float32 and not np.array_equal(f_bf16, f_fp32)  # bf16 arithmetic did run
    cosine = np.sum(f_bf16 * f_fp32, 1) / np.linalg.norm(f_bf16, axis=1) / np.linalg.norm(f_fp32, axis=1)
    assert cosine.min() > 0.99
