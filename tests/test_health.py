"""The health/ signals against hand-computed values and analytic limits, and in a real run's log."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sslkit.health import embedding_health


def test_a_collapsed_batch():
    z = torch.tensor([[3.0, 4.0]]).repeat(16, 1)  # one point, any scale
    h = embedding_health(z, z * 2)
    assert h["health/std"] == pytest.approx(0.0, abs=1e-6) and h["health/rankme"] == pytest.approx(1.0, abs=1e-4)
    assert h["health/uniformity"] == pytest.approx(0.0, abs=1e-6)  # log mean exp(0)
    assert h["health/alignment"] == pytest.approx(0.0, abs=1e-6)
    assert h["health/pos_sim"] == pytest.approx(1.0) and h["health/neg_sim"] == pytest.approx(1.0)


def test_hand_computed_pairs():
    # Two antipodal points: squared distance 4, uniformity log exp(-8) = -8, cosine -1.
    h = embedding_health(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert h["health/uniformity"] == pytest.approx(-8.0) and h["health/neg_sim"] == pytest.approx(-1.0)
    assert h["health/std"] == pytest.approx((math.sqrt(2) + 0) / 2)  # dimension 0: +-1 (std sqrt 2), dimension 1: 0
    # Two orthogonal directions used equally: two equal singular values, effective rank 2.
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).repeat(5, 1)
    h = embedding_health(z)
    assert h["health/rankme"] == pytest.approx(2.0, abs=1e-4)
    assert h["health/rankme_ratio"] == pytest.approx(2.0 / 3, abs=1e-4)  # of min(B, D) = min(10, 3)
    # Positives at 90 degrees: alignment ||a - b||^2 = 2, cosine 0.
    a, b = torch.eye(2), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    h = embedding_health(a, b)
    assert h["health/alignment"] == pytest.approx(2.0) and h["health/pos_sim"] == pytest.approx(0.0, abs=1e-7)


def test_uniform_embeddings_reach_the_analytic_limits():
    """Isotropic Gaussian rows, normalised, are uniform on the sphere: each coordinate has variance 1/D
    (std_ratio 1) and every direction is used equally (effective rank D)."""
    d = 8
    z = torch.randn(20_000, d, generator=torch.Generator().manual_seed(0))
    h = embedding_health(z)
    assert h["health/std_ratio"] == pytest.approx(1.0, abs=0.01)
    assert h["health/rankme"] == pytest.approx(d, abs=0.05) and h["health/rankme_ratio"] == pytest.approx(1, abs=0.01)
    assert h["health/neg_sim"] == pytest.approx(0.0, abs=0.01)


@pytest.mark.slow
def test_a_training_run_logs_the_signals(tmp_path):
    from sslkit.config import load_config, recipe_path
    from sslkit.engine import train
    from sslkit.sharding.synthetic import make_synthetic

    make_synthetic(tmp_path / "train", num_samples=96, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    tiny = ["model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]", "method.queue_size=64",
            "data.batch_size=16", "data.shuffle_buffer=64", "data.workers=0", "tracker.name=none",
            "train.log_every=1", "train.eval_every=0", "train.max_steps=3"]
    run = train(load_config(recipe_path("demo"), [*tiny, f"data.shards={tmp_path / 'train'}",
                                                  f"run.dir={tmp_path / 'run'}"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 < r["health/std_ratio"] <= 1.0 + 1e-6 and 1 <= r["health/rankme"] <= 8 + 1e-4
        assert r["health/uniformity"] <= 0 and -1 <= r["health/pos_sim"] <= 1
        assert r["health/queue_filled"] == pytest.approx(min(1.0, 16 * r["step"] / 64))  # logged after the push
    # The key encoder starts as a copy and moves away step by step (momentum 0.9 in the demo recipe).
    assert rows[0]["health/key_distance"] > 0 and rows[2]["health/key_distance"] > rows[0]["health/key_distance"]
