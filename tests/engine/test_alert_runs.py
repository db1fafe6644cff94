"""Failing runs reproduced at a tiny size: each train.alert rule fires and names its signal in the log and
in alerts.jsonl, train.alert.action=stop ends the run with the alert's sentence, and a healthy run raises none."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslkit.checkpoint import complete_checkpoints
from sslkit.config import load_config, recipe_path
from sslkit.engine import RunStopped, train
from sslkit.methods.ccrl import CCRL

from .conftest import TINY
from .test_faults import _nan_after

ROOT = Path(__file__).resolve().parents[2]


def _cfg(shards, run_dir, *extra):
    return load_config(recipe_path("demo"), [*TINY, f"data.shards={shards}", f"run.dir={run_dir}", "data.workers=0",
                                             *extra])


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _alerts(run):
    path = run / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _identical_images(monkeypatch):
    """Every crop black: with no stain jitter every view of every sample is the same image, so the encoder
    cannot tell samples apart (the constant-input failure: a broken loader, a blank slide)."""
    real = CCRL.prepare

    def prepare(self, batch, generator=None):
        return real(self, {**batch, "image": torch.zeros_like(batch["image"])}, generator)

    monkeypatch.setattr(CCRL, "prepare", prepare)


def test_a_healthy_short_run_raises_no_alert_and_logs_the_chance_loss(tiny_shards, tmp_path, caplog):
    run = train(_cfg(tiny_shards / "train", tmp_path / "run", "train.max_steps=6"))
    assert _alerts(run) == [] and "collapse:" not in caplog.text and "chance:" not in caplog.text
    rows = [r for r in _rows(run) if "loss" in r]
    # CCRL's chance: log(16 in-batch keys + the queued ones), the queue of 64 filling by 16 a step.
    assert [r["loss_chance"] for r in rows] == pytest.approx([math.log(16 + min(64, 16 * i)) for i in range(6)])
    assert all(r["wall_time_s"] > 0 for r in rows) and rows[-1]["wall_time_s"] > rows[0]["wall_time_s"]


def test_identical_images_collapse_and_hold_the_loss_at_chance(tiny_shards, tmp_path, monkeypatch, caplog):
    _identical_images(monkeypatch)
    run = train(_cfg(tiny_shards / "train", tmp_path / "run", "train.max_steps=5", "data.views.hed=0",
                     "train.alert.patience=3", "train.alert.chance_after=0"))
    alerts = {a["rule"]: a for a in _alerts(run)}
    assert set(alerts) == {"collapse", "chance"}  # once each: the episodes last to the end of the run
    collapse, chance = alerts["collapse"], alerts["chance"]
    assert (collapse["signal"], collapse["step"], collapse["since"]) == ("health/std_ratio", 3, 1)
    assert collapse["value"] == pytest.approx(0.0, abs=1e-3) and collapse["threshold"] == 0.05
    assert (chance["signal"], chance["step"], chance["since"]) == ("loss", 3, 1)
    assert chance["value"] == pytest.approx(math.log(48), rel=1e-3)  # at chance: 16 keys + 32 queued, all equal
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert collapse["message"] in warnings and chance["message"] in warnings
    assert collapse["message"].startswith("collapse: health/std_ratio ")


def test_a_huge_weight_decay_holds_the_loss_at_chance(tiny_shards, tmp_path):
    # AdamW with lr x weight_decay = 1 sets every weight to about zero at each step.
    run = train(_cfg(tiny_shards / "train", tmp_path / "run", "train.max_steps=8", "optim.name=adamw",
                     "optim.weight_decay=500", "train.alert.patience=3", "train.alert.chance_after=4"))
    chance = [a for a in _alerts(run) if a["rule"] == "chance"]
    assert chance and chance[0]["signal"] == "loss" and chance[0]["since"] >= 4
    assert chance[0]["value"] >= chance[0]["threshold"] == pytest.approx(0.97 * math.log(80))  # the queue is full
    assert "optim.weight_decay" in chance[0]["message"]


def test_a_non_finite_step_raises_the_nonfinite_alert(tiny_shards, tmp_path, monkeypatch):
    _nan_after(monkeypatch, {3})
    run = train(_cfg(tiny_shards / "train", tmp_path / "run", "train.max_steps=5"))
    (alert,) = _alerts(run)
    assert (alert["rule"], alert["signal"], alert["value"], alert["step"]) == ("nonfinite", "skipped_steps", 1.0, 3)
    assert "optim.grad_clip" in alert["message"]


def test_action_stop_ends_the_run_with_the_alerts_sentence(tiny_shards, tmp_path, monkeypatch):
    _identical_images(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(RunStopped, match=r"^collapse: health/std_ratio \S+ < 0.05 for 3 logged steps \(since step 1\): "
                                         r"the embeddings have collapsed.*; stopped at step 3 by "
                                         r"train.alert.action=stop .*checkpoints saved before are intact\.$"):
        train(_cfg(tiny_shards / "train", run, "train.max_steps=20", "data.views.hed=0", "train.alert.patience=3",
                   "train.alert.chance_margin=null", "train.alert.action=stop", "train.ckpt_every=2"))
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [2]  # nothing saved at or after the stop
    assert [a["rule"] for a in _alerts(run)] == ["collapse"]


@pytest.mark.slow
def test_a_stop_decided_on_the_main_process_ends_every_rank(tiny_shards, tmp_path):
    """Two ranks under accelerate launch: rank 0 judges (its own batch's health/ signals) and broadcasts the
    verdict, so both ranks stop at the same step with the same sentence instead of one waiting for the other."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    run = tmp_path / "run"
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch" / "cpu-2proc.yaml"), "-m", "sslkit",
           "pretrain", "demo", *TINY, f"data.shards={tiny_shards / 'train'}", f"run.dir={run}", "train.max_steps=30",
           "method.queue_size=256", "optim.name=adamw", "optim.weight_decay=500", "train.alert.patience=2",
           "train.alert.action=stop"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    # Each rank prints its own line; two processes share stderr, so one's line may run into the other's
    # (print writes the text and the newline separately) or follow rank 0's progress bar: match each sentence.
    errors = re.findall(r"sslkit: error: (collapse: health/std_ratio \S+ < 0.05 for 2 logged steps [^\r\n]*?"
                        r"stopped at step \d+ by train\.alert\.action=stop)", proc.stderr)
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]  # each rank, the same verdict
    assert [a["rule"] for a in _alerts(run)] == ["collapse"]  # written once, by the main process
