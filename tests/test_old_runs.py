"""A run directory written by sslkit 0.1 before the method contract, run-directory module and
sharding packages existed (tests/fixtures/run-0.1-ccrl: a 2-step CCRL run, its checkpoint's
weights and trainer state as that version wrote them) still loads, evaluates and exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from sslkit.cli import main
from sslkit.export import load_backbone
from sslkit.rundir import load_trained, stored_config
from sslkit.sharding.synthetic import make_synthetic

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run-0.1-ccrl"


def test_a_run_written_before_this_layout_loads_evaluates_and_exports(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its data.shards (shards/demo/train, relative) is not here
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    cfg = stored_config(run)
    assert (cfg.method.name, cfg.model.backbone_kwargs["width"], cfg.model.projector) == ("ccrl", 4, [16, 8])

    cfg, method, state = load_trained(run)
    assert state["step"] == 2 and method.momentum_encoder and int(method.queue.filled) == 32

    make_synthetic(tmp_path / "eval", num_samples=48, size=32, seed=1, shard_size=48, prefix="eval", progress=False)
    main(["evaluate", str(run), "--shards", str(tmp_path / "eval"), "eval.restarts=1", "eval.knn_k=5",
          "eval.plots=false", "eval.baselines=false"])
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["num_samples"] == 48 and metrics["momentum_encoder"] is True
    # its training shards are not here: the probe is cross-validated and says why
    assert metrics["probe"]["note"].startswith("cross-validated: the training shards cannot be read")
    feats = torch.from_numpy(np.load(run / "eval" / "embeddings.npy"))

    main(["export", str(run), "--out", str(tmp_path / "old.safetensors")])
    assert "momentum encoder of the ccrl run at step 2" in capsys.readouterr().out
    model, info = load_backbone(tmp_path / "old.safetensors")
    assert info["step"] == 2 and model.num_features == feats.shape[1]
