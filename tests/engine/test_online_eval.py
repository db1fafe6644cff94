"""Online evaluation during training: logged at the right steps, equal to the offline computation,
and invisible to training itself (same weights with it on or off)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sslkit.checkpoint import latest_checkpoint
from sslkit.config import ConfigError, load_config, recipe_path
from sslkit.data.shardset import resolve_shards
from sslkit.embed import embed_shards
from sslkit.engine import train
from sslkit.evaluate.knn import knn_eval
from sslkit.evaluate.online import OnlineEval
from sslkit.rundir import load_trained

from .conftest import TINY


def _cfg(shards, run_dir, *extra):
    return load_config(recipe_path("demo"), [*TINY, f"data.shards={shards / 'train'}", f"run.dir={run_dir}",
                                             f"eval.shards={shards / 'eval'}", "train.max_steps=4", *extra])


@pytest.mark.slow
def test_online_eval_is_logged_and_leaves_training_unchanged(tiny_shards, tmp_path):
    with_eval = train(_cfg(tiny_shards, tmp_path / "on", "train.eval_every=2", "eval.online_samples=64"))
    without = train(_cfg(tiny_shards, tmp_path / "off", "train.eval_every=0"))
    rows = [json.loads(line) for line in (with_eval / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in rows if "online/knn_top1" in r]
    assert [r["step"] for r in online] == [2, 4]
    for r in online:
        assert r["online/samples"] == 64
        assert 0.0 <= r["online/knn_top1"] <= 1.0 and -1.0 <= r["online/ari"] <= 1.0
        assert 0.0 < r["online/eval_share"] < 1.0 and r["online/seconds"] > 0
    assert not any("online/knn_top1" in json.loads(line) for line in
                   (without / "metrics.jsonl").read_text().splitlines())
    # Evaluating between steps draws no random numbers training uses: the weights are bit-identical.
    a = load_file(str(latest_checkpoint(with_eval / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(without / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_online_scores_equal_offline_scores(tiny_shards, tmp_path):
    run = train(_cfg(tiny_shards, tmp_path / "run", "train.eval_every=0", "train.max_steps=2"))
    cfg, method, _ = load_trained(run)
    cfg.eval.shards, cfg.eval.online_samples = str(tiny_shards / "eval"), 96
    scores = OnlineEval(cfg, device="cpu")(method)
    # The independent path: the evaluation loader's float crops, embedded in sample-key order.
    fn = lambda x: method.embed(x, encoder=cfg.eval.encoder, features=cfg.eval.features)  # noqa: E731
    feats, labels, _ = embed_shards(fn, resolve_shards(tiny_shards / "eval"), size=32, channels=3, workers=0)
    assert scores["online/samples"] == len(labels) == 96
    expected = knn_eval(feats, labels, k=cfg.eval.knn_k, tau=cfg.eval.knn_tau)["top1"]
    assert scores["online/knn_top1"] == pytest.approx(expected, abs=1e-12)
    assert np.isfinite(scores["online/ami"])


def test_online_eval_needs_eval_shards(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="eval.shards"):
        load_config(recipe_path("demo"), [*TINY, "train.eval_every=5", "eval.shards=null"])
