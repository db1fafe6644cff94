"""`sslkit demo` end to end at a tiny size: shards -> CCRL -> embeddings -> FAISS -> table."""

import json

import pytest

from sslkit.cli import main

TINY = [
    "model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]",
    "method.queue_size=64", "data.batch_size=32", "data.shuffle_buffer=64", "data.workers=1",
    "train.max_steps=4", "train.ckpt_every=2", "eval.restarts=1", "eval.knn_k=5", "eval.online_samples=48",
    "eval.projection=tsne",  # UMAP's first fit compiles for ~20 s; tests/evaluate/test_plots.py covers it
]


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    main(["demo", "--shards", str(tmp_path / "shards"), "--num-train", "192", "--num-eval", "96",
          *TINY, f"run.dir={run}"])
    out = capsys.readouterr().out
    for row in ("CCRL (momentum encoder)", "random-init backbone", "raw pixels", "AMI", "kNN top1"):
        assert row in out

    for split, n in (("train", 192), ("eval", 96)):
        manifest = json.loads((tmp_path / "shards" / split / "manifest.json").read_text())
        assert manifest["num_samples"] == n and len(manifest["classes"]) >= 4

    assert (run / "config.yaml").read_text().startswith("# git:")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4]  # log_every 10 from configs/demo.yaml: the last step
    assert [r["step"] for r in rows if "online/knn_top1" in r] == [4]  # eval_every 50: at the end only
    assert not (run / "alerts.jsonl").exists()  # a healthy run raises no train.alert with the defaults
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "W&B offline run was written"

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == 96 and metrics["step"] == 4
    for block in (metrics, metrics["baselines"]["raw_pixels"], metrics["baselines"]["random_init"]):
        assert set(block["cluster"]) == {"ami", "ari", "nmi", "purity", "acc", "f1", "k"}
        assert block["cluster"]["k"] == 4 and 0.0 <= block["cluster"]["purity"] <= 1.0
        assert 0.0 <= block["knn"]["top1"] <= 1.0 and block["knn"]["k"] == 5
    # The three embeddings are different objects: their scores are not all identical.
    amis = {metrics["cluster"]["ami"], metrics["baselines"]["raw_pixels"]["cluster"]["ami"],
            metrics["baselines"]["random_init"]["cluster"]["ami"]}
    assert len(amis) == 3
    # Plots and the report: every figure listed is on disk and inside report.html.
    assert {fig["name"] for fig in metrics["figures"]} >= {"curves", "embedding_map", "cluster_confusion", "gallery"}
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(metrics["figures"])
    assert "Report:" in out and "sslkit export" in out


def test_bad_override_is_one_clear_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--shards", str(tmp_path / "shards"), "optim.lrr=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "sslkit: error: Unknown config key 'optim.lrr' in override 'optim.lrr=1'; did you mean 'optim.lr'?"
    assert not (tmp_path / "shards").exists()  # refused before any work
