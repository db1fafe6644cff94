"""bench/quality.py runs end to end on tiny shards (a smoke test: its figures are not asserted, only
that every row and column is there, computed from the seeds' own metrics)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sslkit.sharding.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]", "method.queue_size=64",
        "data.batch_size=16", "data.shuffle_buffer=64", "data.workers=0", "tracker.name=none", "train.max_steps=2",
        "train.eval_every=0", "eval.restarts=1", "eval.knn_k=5", "eval.probe_samples=96"]


@pytest.mark.slow
def test_quality_bench_on_tiny_shards(tmp_path):
    make_synthetic(tmp_path / "train", num_samples=96, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    make_synthetic(tmp_path / "test", num_samples=64, size=32, seed=1, shard_size=32, prefix="test", progress=False)
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "bench/quality.py", "demo", "--train", str(tmp_path / "train"),
                           "--test", str(tmp_path / "test"), "--seeds", "2", "--out", str(out), *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio=")
    for row in ("CCRL (momentum encoder)", "random init", "raw pixels", "morphology"):
        assert any(line.startswith(row) for line in lines), row
    assert "seen in training: no" in proc.stdout
    report = json.loads((out / "quality.json").read_text())
    per_seed = [json.loads((out / f"seed{s}" / "eval" / "metrics.json").read_text()) for s in (0, 1)]
    amis = [m["cluster"]["ami"] for m in per_seed]
    assert report["table"]["trained"]["AMI"]["min"] == pytest.approx(min(amis))
    assert report["table"]["trained"]["AMI"]["mean"] == pytest.approx(sum(amis) / 2)
    raw = sum(m["baselines"]["raw_pixels"]["cluster"]["ami"] for m in per_seed) / 2
    assert report["ami_minus_raw"] == pytest.approx(sum(amis) / 2 - raw)
    assert float(lines[-1].removeprefix("ratio=")) == pytest.approx(report["ami_minus_raw"], abs=6e-4)


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shift_summary_by_hand():
    table = _bench().summarize_shifts([{"none": 0.9, "blur-1": 0.8}, {"none": 0.7, "blur-1": 0.6}])
    assert table["none"] == pytest.approx({"mean": 0.8, "std": 0.1, "min": 0.7, "drop": 0.0})
    assert table["blur-1"] == pytest.approx({"mean": 0.7, "std": 0.1, "min": 0.6, "drop": 0.1})


@pytest.mark.slow
def test_unshifted_head_accuracy_is_the_evaluations(tmp_path):
    """--shifts scores the head through its own loop: unshifted, it must give what `sslkit evaluate`
    gives; a method without a head is refused with a sentence."""
    from sslkit.config import load_config
    from sslkit.engine import train
    from sslkit.evaluate.run import evaluate_run

    bench = _bench()
    make_synthetic(tmp_path / "train", num_samples=96, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    make_synthetic(tmp_path / "test", num_samples=64, size=32, seed=1, shard_size=32, prefix="test", progress=False)
    cfg = load_config(None, [
        "method.name=scl", "model.backbone=preact_resnet18", "model.backbone_kwargs.width=4", "model.embed_dim=8",
        f"data.shards={tmp_path / 'train'}", f"eval.shards={tmp_path / 'test'}", "data.balanced.classes=4",
        "data.balanced.per_class=2", "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=64",
        "tracker.name=none", "train.max_steps=3", f"run.dir={tmp_path / 'scl'}"])
    train(cfg)
    metrics = evaluate_run(tmp_path / "scl", overrides=["eval.plots=false", "eval.baselines=false", "eval.probe=false"])
    scores = bench.shifted_accuracy(tmp_path / "scl", str(tmp_path / "test"), ["contrast-0.6", "resolution-1/2"])
    assert list(scores) == ["none", "contrast-0.6", "resolution-1/2"]
    assert scores["none"] == pytest.approx(metrics["classifier"]["accuracy"], abs=1e-9)
    assert all(0.0 <= v <= 1.0 for v in scores.values())

    ccrl = load_config(None, [f"data.shards={tmp_path / 'train'}", f"run.dir={tmp_path / 'ccrl'}", *TINY])
    train(ccrl)
    with pytest.raises(SystemExit, match="has none; use it with scl"):
        bench.shifted_accuracy(tmp_path / "ccrl", str(tmp_path / "test"), ["blur-1"])
