"""Trackers: the offline W&B run read back with wandb's own reader (`wandb leet inspect --json`),
resumed runs continuing the same W&B run, its layout (groups, step and wall-time axes), alerts, evaluation
logged to it with the embedding table, TensorBoard's scalars, images, text and projector, no API key on disk."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sslkit import tracking
from sslkit.checkpoint import latest_checkpoint, read_state
from sslkit.config import load_config, recipe_path
from sslkit.embed import save_embeddings
from sslkit.engine import RunStopped, train
from sslkit.methods.ccrl import CCRL
from sslkit.sharding.synthetic import make_synthetic
from sslkit.tracking import log_evaluation, numeric_leaves, projector_sample, tracker_key

pytest.importorskip("wandb")

# A model small enough that a few steps take seconds on 2 CPU cores (as tests/engine/conftest.py).
TINY = [
    "model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]",
    "method.queue_size=64", "data.batch_size=16", "data.shuffle_buffer=64", "data.workers=1",
    "train.log_every=1", "optim.warmup_steps=2", "train.ckpt_every=4", "train.eval_every=0",
]
SECRET = "sslkit-test-secret-0123456789abcdef0123456789abcdef"  # a fake API key that must never reach RUN/
METRICS = {"cluster": {"ami": 0.25, "acc": 0.5, "k": 5},
           "knn": {"top1": 0.625, "k": 20},
           "probe": {"accuracy": 0.75, "protocol": "5-fold", "auc": None, "note": "cross-validated"},
           "baselines": {"raw_pixels": {"knn": {"top1": 0.6875}}, "random_init": {"cluster": {"ami": 0.03}}}}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _wandb_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wandb", *args], capture_output=True, text=True, env=_env(),
                          timeout=120)


def _records(folder: Path) -> list[dict]:
    """Every record of an offline run's .wandb file, decoded by wandb itself (no hand parsing)."""
    out = _wandb_cli("leet", "inspect", "--json", str(folder))
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _of(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def _history(records: list[dict]) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for h in _of(records, "history"):
        rows.setdefault(int(h["step"]["num"]), {}).update(h["item"])
    return rows


def _eval_arrays(run: Path, n: int = 2500, d: int = 4) -> None:
    """What `sslkit evaluate` leaves in RUN/eval before it logs: more embeddings than the table takes."""
    rng = np.random.default_rng(1)
    save_embeddings(run / "eval", rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 3, n),
                    [f"crop-{i:05d}" for i in range(n)], clusters=rng.integers(0, 4, n))
    (run / "eval" / "metrics.json").write_text(json.dumps({"classes": ["round", "elongated", "large"]}))


def _png(path: Path) -> Path:
    rgb = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_synthetic(root / "train", num_samples=160, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    return root / "train"


def _cfg(shards: Path, run: Path, *extra: str):
    return load_config(recipe_path("demo"), [*TINY, f"data.shards={shards}", f"run.dir={run}", *extra])


@pytest.fixture(scope="module")
def wandb_run(shards, tmp_path_factory):
    """Train 4 steps, resume to 8 (run.resume=auto), then log an evaluation: all offline, with a
    fake API key in the environment."""
    run = tmp_path_factory.mktemp("wandb") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", SECRET)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DATA_DIR", str(run.parent / "wandb-data"))  # where W&B stages a table, not ~/.local
        train(_cfg(shards, run, "train.max_steps=4", "tracker.name=wandb"))
        first = read_state(latest_checkpoint(run / "checkpoints"))
        cfg = _cfg(shards, run, "train.max_steps=8", "tracker.name=wandb", "run.resume=auto")
        train(cfg)
        state = read_state(latest_checkpoint(run / "checkpoints"))
        png = _png(run.parent / "umap.png")
        _eval_arrays(run)
        log_evaluation(run, cfg, run_id=state["run_id"], step=state["step"], metrics=METRICS, images={"umap": png})
    folders = sorted(run.glob("wandb/offline-run-*"))
    records = {folder: _records(folder) for folder in folders}
    # Folder names have one-second resolution (wandb adds -1, -2 on clashes): order by start time.
    folders.sort(key=lambda f: _of(records[f], "run")[0]["start_time"])
    return SimpleNamespace(run=run, cfg=cfg, first=first, state=state, png=png, folders=folders, records=records)


def test_offline_run_holds_config_git_and_training_metrics(wandb_run):
    r = wandb_run
    assert r.first["run_id"] and r.first["run_id"] == r.state["run_id"]  # the resumed run kept the id
    assert len(r.folders) == 3  # train to 4, resume to 8, evaluation: one offline folder each
    logged = {}
    for line in (r.run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        logged.setdefault(row.pop("step"), {}).update(row)
    for folder, steps in zip(r.folders[:2], ([1, 2, 3, 4], [5, 6, 7, 8])):
        records = r.records[folder]
        (run_record,) = _of(records, "run")
        assert run_record["run_id"] == r.state["run_id"]
        config = {}
        for c in _of(records, "config"):
            config.update(c["update"])
        assert config["git"] == tracking.git_sha()
        assert config["optim"]["lr"] == r.cfg.optim.lr and config["train"]["max_steps"] == (4 if steps[0] == 1 else 8)
        history = _history(records)
        assert sorted(history) == steps  # the resumed process continues at step 5, not at 0
        for step in steps:
            for key in ("loss", "lr", "pairs_per_s", "health/std_ratio", "loss_chance", "wall_time_s"):
                # metrics.jsonl is written independently of W&B: the same numbers at the same steps, grouped.
                assert history[step][tracker_key(key)] == pytest.approx(logged[step][key], rel=1e-12), (step, key)
            assert history[step]["train/step"] == step


def test_wandb_groups_and_axes(wandb_run):
    records = wandb_run.records[wandb_run.folders[1]]  # the resumed process sets its layout again
    row = _history(records)[8]
    groups = {key.split("/")[0] for key in row if not key.startswith("_")}
    assert groups == {"train", "health", "system"}  # nothing ungrouped
    assert {"train/loss", "train/lr", "train/grad_norm", "train/loss_chance", "train/pos_sim"} <= set(row)
    assert {"system/pairs_per_s", "system/data_wait_share", "system/mem_peak_gb", "system/wall_time_s"} <= set(row)
    assert {"health/std_ratio", "health/rankme_ratio", "health/queue_filled"} <= set(row)
    # The wall-time axis continues across the resume: seconds of training, not of the clock.
    first = _history(wandb_run.records[wandb_run.folders[0]])[4]
    assert row["system/wall_time_s"] > first["system/wall_time_s"]
    metrics = {m.get("name") or m.get("glob_name"): m for m in _of(records, "metric")}
    assert "train/step" in metrics
    for group in ("train", "health", "online", "system"):
        assert metrics[f"{group}/*"]["step_metric"] == "train/step", group


def test_tracker_key_maps_flat_keys_to_groups():
    assert [tracker_key(k) for k in ("loss", "skipped_steps", "pairs_per_s", "wall_time_s", "health/std",
                                     "online/ami", "eval/cluster/ami")] == [
        "train/loss", "train/skipped_steps", "system/pairs_per_s", "system/wall_time_s", "health/std", "online/ami",
        "eval/cluster/ami"]


def test_evaluation_is_logged_to_the_same_run(wandb_run):
    r = wandb_run
    records = r.records[r.folders[-1]]
    assert _of(records, "run")[0]["run_id"] == r.state["run_id"]
    history = _history(records)
    assert list(history) == [8]  # the trained step
    row = history[8]
    expected = {"eval/cluster/ami": 0.25, "eval/cluster/acc": 0.5, "eval/cluster/k": 5, "eval/knn/top1": 0.625,
                "eval/knn/k": 20, "eval/probe/accuracy": 0.75, "eval/baselines/raw_pixels/knn/top1": 0.6875,
                "eval/baselines/random_init/cluster/ami": 0.03, "eval/step": 8}
    assert {k: row[k] for k in expected} == expected
    assert "eval/probe/protocol" not in row and "eval/probe/auc" not in row  # strings and None are left out
    summary = {}
    for s in _of(records, "summary"):
        summary.update(s["update"])
    assert summary["eval/baselines/raw_pixels/knn/top1"] == 0.6875
    # The figure: a copy of the PNG under files/media/images/, named in the history row.
    (image,) = (r.folders[-1] / "files").glob("media/images/**/*.png")
    assert row["eval/umap.path"] == image.relative_to(r.folders[-1] / "files").as_posix()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == hashlib.sha256(r.png.read_bytes()).hexdigest()
    assert (row["eval/umap.width"], row["eval/umap.height"]) == (40, 24)


def test_evaluation_logs_a_sample_of_the_embeddings_as_a_table(wandb_run):
    r = wandb_run
    row = _history(r.records[r.folders[-1]])[8]
    assert (row["eval/embeddings._type"], row["eval/embeddings.nrows"], row["eval/embeddings.ncols"]) == \
        ("table-file", tracking.PROJECTOR_ROWS, 3 + 4)
    table = json.loads((r.folders[-1] / "files" / row["eval/embeddings.path"]).read_text())
    assert table["columns"] == ["key", "class", "cluster", "d0", "d1", "d2", "d3"]
    # The seeded sample of the 2,500 rows, in file order, each row's class named and its cluster a label.
    sample = projector_sample(r.run / "eval", seed=r.cfg.run.seed)
    assert [t[0] for t in table["data"]] == sample["key"] and sorted(set(sample["key"])) == sample["key"]
    feats = np.load(r.run / "eval" / "embeddings.npy")
    labels, clusters = np.load(r.run / "eval" / "labels.npy"), np.load(r.run / "eval" / "clusters.npy")
    names = ["round", "elongated", "large"]
    for key, name, cluster, *vector in table["data"][:50]:
        i = int(key.split("-")[1])
        assert (name, cluster) == (names[labels[i]], str(clusters[i]))
        assert vector == pytest.approx(feats[i].tolist(), rel=1e-6)
    assert projector_sample(r.run / "nowhere", seed=0) is None


def _identical_images(monkeypatch):
    """Every crop black (no stain jitter): all embeddings the same, a collapse within three steps."""
    real = CCRL.prepare
    monkeypatch.setattr(CCRL, "prepare", lambda self, batch, generator=None: real(
        self, {**batch, "image": torch.zeros_like(batch["image"])}, generator))


def test_a_stopping_alert_reaches_wandb_and_fails_the_run(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _identical_images(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(RunStopped, match="^collapse: health/std_ratio") as stopped:
        train(_cfg(shards, run, "train.max_steps=10", "tracker.name=wandb", "data.views.hed=0",
                   "train.alert.patience=2", "train.alert.action=stop"))
    (folder,) = run.glob("wandb/offline-run-*")
    records = _records(folder)
    (alert,) = _of(records, "alert")
    (line,) = (run / "alerts.jsonl").read_text().splitlines()
    recorded = json.loads(line)
    assert (alert["title"], alert["level"]) == ("collapse: health/std_ratio", "WARN")
    assert alert["text"] == recorded["message"] and str(stopped.value).startswith(recorded["message"].rstrip("."))
    assert _of(records, "exit")[-1]["exit_code"] == 1  # the W&B run ends as failed
    assert sorted(_history(records)) == [1, 2]  # the rows up to the stop were kept


def test_wandb_sync_would_upload_every_folder_of_the_run(wandb_run):
    # --dry-run lists what `wandb sync` would upload and returns before any login or network call.
    out = _wandb_cli("sync", "--dry-run", "--verbose", str(wandb_run.run / "wandb"))
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "Would sync 3 run(s)" in text
    for folder in wandb_run.folders:
        assert f"{folder.name}/run-{wandb_run.state['run_id']}.wandb" in text


def test_api_key_is_never_written_to_the_run_directory(wandb_run):
    files = [p for p in wandb_run.run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "config.yaml" for p in files)
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []


def _nan_on(monkeypatch, call: int):
    """CCRL's loss is NaN on forward call ``call``: that step is skipped and the nonfinite alert fires."""
    real, count = CCRL.forward, [0]

    def forward(self, batch):
        count[0] += 1
        out = real(self, batch)
        return out._replace(loss=out.loss * float("nan")) if count[0] == call else out

    monkeypatch.setattr(CCRL, "forward", forward)


def test_tensorboard_logs_training_config_and_evaluation(shards, tmp_path, monkeypatch):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    _nan_on(monkeypatch, 2)
    run = train(_cfg(shards, tmp_path / "run", "train.max_steps=2", "tracker.name=tensorboard"))
    cfg = _cfg(shards, run, "tracker.name=tensorboard")
    png = _png(tmp_path / "umap.png")
    _eval_arrays(run)
    log_evaluation(run, cfg, run_id=None, step=2, metrics=METRICS, images={"umap": png})
    acc = ea_mod.EventAccumulator(str(run / cfg.tracker.project), size_guidance={"images": 0, "scalars": 0,
                                                                                 "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    # The same groups as W&B, training's and evaluation's scalars in one run.
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/loss_chance", "train/skipped_steps",
                "system/pairs_per_s", "system/wall_time_s", "health/std_ratio", "eval/cluster/ami",
                "eval/baselines/raw_pixels/knn/top1"}
    assert expected <= set(tags["scalars"])
    assert not {tag for tag in tags["scalars"] if "/" not in tag}  # nothing ungrouped
    (ami,) = acc.Scalars("eval/cluster/ami")
    assert (ami.step, ami.value) == (2, pytest.approx(0.25))
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    (img,) = acc.Images("eval/umap")
    assert (img.step, img.width, img.height) == (2, 40, 24)
    # The alert as text at the step it fired.
    (text,) = acc.Tensors("alert/nonfinite/text_summary")
    message = json.loads((run / "alerts.jsonl").read_text())["message"]
    assert text.step == 2 and text.tensor_proto.string_val[0].decode() == message
    # The embedding sample in TensorBoard's projector: its metadata rows name each crop's class and cluster.
    config = (run / cfg.tracker.project / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "eval/embeddings:00002"' in config
    metadata = next((run / cfg.tracker.project).glob("00002/**/metadata.tsv")).read_text().splitlines()
    sample = projector_sample(run / "eval", seed=cfg.run.seed)
    assert metadata[0].split("\t") == ["key", "class", "cluster"] and len(metadata) == 1 + tracking.PROJECTOR_ROWS
    assert metadata[1].split("\t") == [sample["key"][0], sample["class"][0], sample["cluster"][0]]
    # The config went in as TensorBoard hyper-parameters (flat keys, git included).
    hparams = next(run.glob(f"{cfg.tracker.project}/*/hparams.yml")).read_text()
    assert "optim/lr:" in hparams and "git:" in hparams


def test_log_evaluation_is_a_no_op_off_the_main_process_and_without_tracker(tmp_path, monkeypatch):
    cfg = load_config(recipe_path("demo"), ["tracker.name=wandb"])
    monkeypatch.setattr(tracking.dist, "is_main_process", lambda: False)
    log_evaluation(tmp_path, cfg, run_id="abc12345", step=3, metrics=METRICS, images={})
    monkeypatch.setattr(tracking.dist, "is_main_process", lambda: True)
    log_evaluation(tmp_path, load_config(recipe_path("demo"), ["tracker.name=none"]), run_id="abc12345", step=3,
                   metrics=METRICS, images={})
    assert list(tmp_path.iterdir()) == []


def test_numeric_leaves_flattens_and_keeps_numbers_only():
    tree = {"a": {"b": 1, "c": {"d": 0.5, "e": "text"}}, "f": None, "g": [1, 2], "h": True, "i": np.float32(2.5),
            "j": np.int64(7)}
    assert numeric_leaves(tree) == {"eval/a/b": 1, "eval/a/c/d": 0.5, "eval/i": 2.5, "eval/j": 7}
    assert numeric_leaves({"x": 1}, prefix="p") == {"p/x": 1}


def test_online_without_credentials_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    online = load_config(recipe_path("demo"), ["tracker.mode=online"]).tracker
    assert tracking._wandb_mode(online) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert tracking._wandb_mode(online) == "online"
