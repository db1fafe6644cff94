"""Evaluate a run directory: embed the evaluation shards with the trained encoder and with
the two baselines every report carries (raw pixels, a randomly initialised backbone),
cluster and kNN each, and write ``eval/metrics.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from sslkit import dist
from sslkit.checkpoint import latest_checkpoint, read_state, resolve_resume
from sslkit.config import Config, EvalConfig, apply_overrides, from_dict
from sslkit.data.stream import ShardSet, resolve_shards
from sslkit.embed import embed_shards
from sslkit.evaluate import evaluate_embeddings
from sslkit.methods import build_method


def load_trained(run_dir: Path, *, checkpoint: str = "auto") -> tuple[Config, torch.nn.Module, dict[str, Any]]:
    """The config, the method with its trained weights, and the trainer state of a checkpoint."""
    root = Path(run_dir) / "checkpoints"
    path = resolve_resume(checkpoint, root=root) if checkpoint != "auto" else latest_checkpoint(root)
    if path is None:
        raise FileNotFoundError(f"No complete checkpoint under {root}; train first with `sslkit pretrain CONFIG`.")
    state = read_state(path)
    cfg = from_dict(state["config"])
    method = build_method(cfg)
    method.load_state_dict(load_file(str(path / "model.safetensors")))
    return cfg, method.eval(), {**state, "checkpoint": str(path)}


def _scores(feats: np.ndarray, labels: np.ndarray, ev: EvalConfig, *, seed: int, normalize: bool) -> dict[str, Any]:
    return evaluate_embeddings(feats, labels, k=ev.k, restarts=ev.restarts, niter=ev.niter, seed=seed,
                               max_points_per_centroid=ev.max_points_per_centroid, knn_k=ev.knn_k,
                               knn_tau=ev.knn_tau, normalize=normalize)


def evaluate_run(run_dir: str | Path, *, overrides: tuple[str, ...] | list[str] = (), device: str | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg, method, state = load_trained(run_dir)
    cfg = apply_overrides(cfg, overrides)
    ev = cfg.eval
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shards = resolve_shards(ev.shards or cfg.data.shards)
    common = dict(size=cfg.data.size, channels=cfg.data.channels, batch_size=ev.batch_size,
                  workers=cfg.data.workers, device=device, max_samples=ev.max_samples)

    method.to(device)
    fn = lambda x: method.embed(x, encoder=ev.encoder, features=ev.features)  # noqa: E731
    feats, labels, keys = embed_shards(fn, shards, desc=f"embed ({ev.encoder} encoder)", **common)
    if (labels < 0).all():
        raise ValueError(f"The evaluation shards at '{ev.shards or cfg.data.shards}' carry no labels "
                         f"('{cfg.data.labels}' field); point eval.shards at labelled shards.")
    results: dict[str, Any] = {
        **_scores(feats, labels, ev, seed=cfg.run.seed, normalize=ev.normalize),
        "method": cfg.method.name.upper(), "encoder": ev.encoder, "features": ev.features, "step": state["step"],
        "checkpoint": state["checkpoint"], "num_samples": int(len(labels)), "classes": shards.classes,
    }
    if hasattr(method, "predict"):  # a classifier head (SCL, fine-tuned runs): its test metrics too
        from sslkit.evaluate.probe import evaluate_classifier

        results["probe"] = evaluate_classifier(run_dir, device=device)["probe"]
    if ev.baselines:
        results["baselines"] = _baselines(cfg, shards, common, labels)
    if dist.is_main_process():
        _write(run_dir / "eval", results, feats, labels, keys)
    return results


def _baselines(cfg: Config, shards: ShardSet, common: dict[str, Any], labels: np.ndarray) -> dict[str, Any]:
    ev = cfg.eval
    raw, raw_labels, _ = embed_shards(lambda x: x.flatten(1), shards, desc="embed (raw pixels)", **common)
    set_seed(cfg.run.seed + 1)
    # A fine-tuned run's config points at its pretrained weights: the baseline must not load them.
    fresh_cfg = apply_overrides(cfg, ["finetune.init=null"]) if cfg.method.name == "finetune" else cfg
    fresh = build_method(fresh_cfg).eval().to(common["device"])
    rand, rand_labels, _ = embed_shards(lambda x: fresh.embed(x, encoder="query", features=ev.features),
                                        shards, desc="embed (random init)", **common)
    assert np.array_equal(raw_labels, labels) and np.array_equal(rand_labels, labels)
    return {
        # Raw pixels are clustered as they are (no L2 normalisation), the classic baseline.
        "raw_pixels": _scores(raw, labels, ev, seed=cfg.run.seed, normalize=False),
        "random_init": _scores(rand, labels, ev, seed=cfg.run.seed, normalize=ev.normalize),
    }


def _write(out: Path, results: dict[str, Any], feats: np.ndarray, labels: np.ndarray, keys: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", feats)
    np.save(out / "labels.npy", labels)
    (out / "keys.txt").write_text("\n".join(keys) + "\n")
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "metrics.json")


def format_table(results: dict[str, Any]) -> str:
    """One text table: the trained encoder and the baselines, clustering and kNN side by side."""
    momentum = results.get("method") in ("CCRL", "SUPCAM")  # the methods with a momentum encoder
    name = results.get("method", "trained")
    rows = [(f"{name} ({results['encoder']} encoder)" if momentum else name, results)]
    for name, label in (("random_init", "random-init backbone"), ("raw_pixels", "raw pixels")):
        if name in results.get("baselines", {}):
            rows.append((label, results["baselines"][name]))
    cols = ("ami", "ari", "nmi", "purity", "acc")
    width = max(len(r[0]) for r in rows) + 2
    head = "".ljust(width) + "".join(c.upper().rjust(8) for c in cols) + "kNN top1".rjust(10)
    lines = [f"k-means (k={results['cluster']['k']}) and kNN (k={results['knn']['k']}) "
             f"on {results['num_samples']} held-out crops", head, "-" * len(head)]
    for label, res in rows:
        cells = "".join(f"{res['cluster'][c]:8.3f}" for c in cols)
        lines.append(label.ljust(width) + cells + f"{res['knn']['top1']:10.3f}")
    if "probe" in results:
        probe = results["probe"]
        lines.append("classifier head: " + "  ".join(f"{k} {probe[k]:.3f}" for k in
                                                     ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc")
                                                     if probe.get(k) is not None))
    return "\n".join(lines)
