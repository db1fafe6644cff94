"""Evaluate a run directory: embed the evaluation shards with the trained encoder and with the
two baselines every report carries (raw pixels, a randomly initialised backbone); score each
with k-means (AMI, ARI, NMI, purity, Hungarian accuracy, F1), kNN top-1 and a linear probe;
add the run's own classifier head when it has one; draw the plots; write ``eval/`` and log it
all to the run's tracker.

    results = evaluate_run("runs/demo")            # eval/metrics.json, eval/*.png, ...
    print(format_table(results))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from sslkit import dist
from sslkit.checkpoint import latest_checkpoint, read_state, resolve_resume
from sslkit.config import Config, ConfigError, EvalConfig, apply_overrides, from_dict
from sslkit.data.augment import to_pixels
from sslkit.data.shardset import ShardSet, resolve_shards
from sslkit.embed import embed_shards
from sslkit.evaluate.cluster import as_features, kmeans, sample_size, whiten
from sslkit.evaluate.knn import knn_eval
from sslkit.evaluate.metrics import cluster_metrics
from sslkit.evaluate.morphology import morphology_features, standardize
from sslkit.evaluate.overlap import training_overlap
from sslkit.evaluate.probe import PROBE_KEYS, cv_probe, linear_probe
from sslkit.methods import build_method
from sslkit.atomic import write_json
from sslkit.errors import MissingInput

Embedder = Callable[[torch.Tensor], torch.Tensor]


def load_trained(run_dir: Path, *, checkpoint: str = "auto") -> tuple[Config, torch.nn.Module, dict[str, Any]]:
    """The config, the method with its trained weights, and the trainer state of a checkpoint."""
    root = Path(run_dir) / "checkpoints"
    path = resolve_resume(checkpoint, root=root) if checkpoint != "auto" else latest_checkpoint(root)
    if path is None:
        raise MissingInput(f"No complete checkpoint under {root}; train first with `sslkit pretrain CONFIG`.")
    state = read_state(path)
    cfg = from_dict(state["config"])
    method = build_method(cfg)
    method.load_state_dict(load_file(str(path / "model.safetensors")))
    return cfg, method.eval(), {**state, "checkpoint": str(path)}


def eval_shards_spec(cfg: Config, *, shards: Optional[str] = None, split: Optional[str] = None) -> str:
    """Which shards to evaluate: ``shards`` (else eval.shards, else data.shards), and with ``split``
    that split of it: the sub-folder ``split`` of a folder written by ``sslkit shard ... --split``,
    or the sibling folder of that name (``shards/gband/test`` with ``--split val``: ``shards/gband/val``)."""
    base = shards or cfg.eval.shards or cfg.data.shards
    if not split:
        return base
    for candidate in (Path(base) / split, Path(base).parent / split):
        if (candidate / "manifest.json").is_file():
            return str(candidate)
    raise ConfigError(f"No split '{split}' at '{Path(base) / split}' or '{Path(base).parent / split}' (no manifest.json); "
                      "pass --shards pointing at the shard folder that holds the splits.")


def _probe_training_set(cfg: Config, test: ShardSet, spec: str) -> tuple[Optional[ShardSet], str]:
    """The labelled shards the linear probe is fitted on: the training shards, when they are not the
    evaluation shards and name the same classes; otherwise None (the probe is cross-validated)."""
    if Path(cfg.data.shards).resolve() == Path(spec).resolve():
        return None, "the training and evaluation shards are the same"
    try:
        train = resolve_shards(cfg.data.shards, manifest=cfg.data.manifest)
    except (OSError, ValueError) as err:
        return None, f"the training shards cannot be read ({err})"
    if train.classes != test.classes:
        return None, "the training shards name other classes"
    return train, f"fitted on up to {cfg.eval.probe_samples} crops of {cfg.data.shards}"


def _score(feats: np.ndarray, labels: np.ndarray, train: Optional[tuple[np.ndarray, np.ndarray]], ev: EvalConfig,
           *, classes: list[str], seed: int, normalize: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``cluster``, ``knn`` and ``probe`` blocks of one embedding set, and what the plots need
    (cluster assignments, the full probe report)."""
    x = as_features(feats, normalize=normalize)
    if ev.whiten:
        x = whiten(x, ev.whiten, normalize=normalize, seed=seed)
    k = ev.k or int(np.unique(labels).size)
    assign, _, _ = kmeans(x, k=k, restarts=ev.restarts, niter=ev.niter, seed=seed,
                          max_train_points=sample_size(ev.kmeans_max_train, k))
    block: dict[str, Any] = {"cluster": {**cluster_metrics(labels, assign), "k": int(k)},
                             "knn": knn_eval(feats, labels, k=ev.knn_k, tau=ev.knn_tau)}
    extra: dict[str, Any] = {"assign": assign}
    if ev.probe:
        if train is not None and (train[1] >= 0).all():
            report = linear_probe(train[0], train[1], feats, labels, classes=classes, seed=seed)
        else:
            report = cv_probe(feats, labels, classes=classes, seed=seed)
        block["probe"] = {**{key: report["probe"][key] for key in PROBE_KEYS if key in report["probe"]},
                          "protocol": report["protocol"], "train_samples": report["train_samples"]}
        extra["probe"] = report
    return block, extra


def _embedders(cfg: Config, method: torch.nn.Module, device: str) -> dict[str, Embedder]:
    ev = cfg.eval
    embedders: dict[str, Embedder] = {"trained": lambda x: method.embed(x, encoder=ev.encoder, features=ev.features)}
    if ev.baselines:
        set_seed(cfg.run.seed + 1)
        # A fine-tuned run's config points at its pretrained weights: the baseline must not load them.
        fresh_cfg = apply_overrides(cfg, ["finetune.init=null"]) if cfg.method.name == "finetune" else cfg
        fresh = build_method(fresh_cfg).eval().to(device)
        embedders["random_init"] = lambda x: fresh.embed(x, encoder="query", features=ev.features)
        embedders["raw_pixels"] = lambda x: x.flatten(1)
    if ev.morphology:
        embedders["morphology"] = lambda x: torch.from_numpy(morphology_features(to_pixels(x).cpu().numpy()))
    return embedders


def _launched_device() -> str:
    """Under ``accelerate launch``/torchrun, join the process group (each rank then embeds its share)
    and use this rank's device; alone, the GPU if there is one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_distributed():
        from accelerate import PartialState

        return str(PartialState(cpu=not torch.cuda.is_available()).device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_run(run_dir: str | Path, *, shards: Optional[str] = None, split: Optional[str] = None,
                 overrides: tuple[str, ...] | list[str] = (), device: Optional[str] = None) -> dict[str, Any]:
    """Evaluate the newest checkpoint of ``run_dir``; returns what ``eval/metrics.json`` holds (on the
    main process; under ``accelerate launch`` the other ranks help embed and return early parts only)."""
    run_dir = Path(run_dir)
    cfg, method, state = load_trained(run_dir)
    cfg = apply_overrides(cfg, overrides)
    ev = cfg.eval
    spec = eval_shards_spec(cfg, shards=shards, split=split)
    device = device or _launched_device()
    test = resolve_shards(spec)
    classes = test.classes or []
    train_set, probe_note = _probe_training_set(cfg, test, spec) if ev.probe else (None, "")
    common = dict(size=cfg.data.size, channels=cfg.data.channels, batch_size=ev.batch_size,
                  workers=cfg.data.workers, device=device)
    method.to(device)

    results: dict[str, Any] = {"method": cfg.method.name.upper(), "encoder": ev.encoder, "features": ev.features,
                               "step": state["step"], "checkpoint": state["checkpoint"], "shards": spec}
    if dist.is_main_process():
        results["seen_in_training"] = training_overlap(cfg.data.shards, test, train_manifest=cfg.data.manifest)
    kept: dict[str, Any] = {}
    for name, fn in _embedders(cfg, method, device).items():
        label = {"trained": f"{ev.encoder} encoder", "random_init": "random init", "raw_pixels": "raw pixels",
                 "morphology": "morphology"}[name]
        feats, labels, keys = embed_shards(fn, test, desc=f"embed ({label})", max_samples=ev.max_samples, **common)
        if (labels < 0).all():
            raise ConfigError(f"The evaluation shards at '{spec}' carry no labels ('{cfg.data.labels}' field); "
                              "point eval.shards (or --shards) at labelled shards.")
        if not classes:
            classes = [str(c) for c in range(int(labels.max()) + 1)]
        train = None
        if train_set is not None:
            tx, ty, _ = embed_shards(fn, train_set, desc=f"embed probe set ({label})",
                                     max_samples=ev.probe_samples, **common)
            train = (tx, ty)
        if not dist.is_main_process():  # every rank embeds its share; the main process scores them all
            continue
        if name == "morphology":  # features of different units: z-scores (with the evaluated set's statistics)
            feats, *probe_feats = standardize(feats, *([train[0]] if train is not None else []))
            train = (probe_feats[0], train[1]) if train is not None else None
        block, extra = _score(feats, labels, train, ev, classes=classes, seed=cfg.run.seed,
                              normalize=ev.normalize and name not in ("raw_pixels", "morphology"))
        if name == "trained":
            results.update(block)
            results.update(num_samples=int(len(labels)), classes=classes)
            if "probe" in block and train_set is None:
                block["probe"]["note"] = f"cross-validated: {probe_note}"
            kept = {"feats": feats, "labels": labels, "keys": keys, "classes": classes, **extra}
        else:
            results.setdefault("baselines", {})[name] = block
        del feats  # raw pixels of a large set are big: keep only the trained encoder's features
    if hasattr(method, "predict"):  # a classifier head (SCL, fine-tuned runs): its test metrics too
        from sslkit.evaluate.probe import classify_shards

        kept["classifier"] = classify_shards(cfg, method, state, test, run_dir=run_dir, device=device)
        results["classifier"] = {key: kept["classifier"]["probe"][key] for key in PROBE_KEYS
                                 if key in kept["classifier"]["probe"]}
    if dist.is_main_process():
        out = run_dir / "eval"
        _write(out, results, kept)
        results["figures"] = _figures(run_dir, cfg, test, kept, method) if ev.plots else []
        write_json(out / "metrics.json", results)
        _log(run_dir, cfg, state, results)
    return results


def _figures(run_dir: Path, cfg: Config, test: ShardSet, kept: dict[str, Any], method: torch.nn.Module) -> list[dict]:
    from sslkit.evaluate.figures import make_figures

    return make_figures(run_dir, cfg, test, kept, method)


def _log(run_dir: Path, cfg: Config, state: dict[str, Any], results: dict[str, Any]) -> None:
    from sslkit.tracking import log_evaluation

    images = {fig["name"]: run_dir / "eval" / fig["file"] for fig in results.get("figures", [])}
    metrics = {key: results[key] for key in ("cluster", "knn", "probe", "classifier", "baselines") if key in results}
    log_evaluation(run_dir, cfg, run_id=state.get("run_id"), step=int(state["step"]), metrics=metrics, images=images)


def _write(out: Path, results: dict[str, Any], kept: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", kept["feats"])
    np.save(out / "labels.npy", kept["labels"])
    np.save(out / "clusters.npy", kept["assign"])
    (out / "keys.txt").write_text("\n".join(kept["keys"]) + "\n")
    if "probe" in kept:
        write_json(out / "probe.json", kept["probe"])
    write_json(out / "metrics.json", results)


def format_table(results: dict[str, Any]) -> str:
    """One text table: the trained encoder and the baselines, clustering, kNN and probe side by side."""
    momentum = results.get("method") in ("CCRL", "SUPCAM")  # the methods with a momentum encoder
    name = results.get("method", "trained")
    rows = [(f"{name} ({results['encoder']} encoder)" if momentum else name, results)]
    for key, label in (("random_init", "random-init backbone"), ("raw_pixels", "raw pixels"),
                       ("morphology", "morphology features")):
        if key in results.get("baselines", {}):
            rows.append((label, results["baselines"][key]))
    cols = ("ami", "ari", "nmi", "purity", "acc")
    probe = "probe" in results
    width = max(len(r[0]) for r in rows) + 2
    head = ("".ljust(width) + "".join(c.upper().rjust(8) for c in cols) + "kNN top1".rjust(10)
            + ("probe acc".rjust(11) if probe else ""))
    lines = [f"k-means (k={results['cluster']['k']}), kNN (k={results['knn']['k']})"
             + (", linear probe" if probe else "") + f" on {results['num_samples']} crops of {results['shards']}",
             head, "-" * len(head)]
    for label, res in rows:
        cells = "".join(f"{res['cluster'][c]:8.3f}" for c in cols) + f"{res['knn']['top1']:10.3f}"
        if probe:
            cells += f"{res['probe']['accuracy']:11.3f}" if "probe" in res else " " * 11
        lines.append(label.ljust(width) + cells)
    if probe:
        lines.append(f"linear probe: {results['probe']['protocol']} ({results['probe']['train_samples']} training crops)")
    seen = results.get("seen_in_training")
    if seen:
        verdict = {"all": "SEEN in training", "partly": "PARTLY SEEN in training", "no": "unseen in training",
                   "unknown": "seen in training: unknown"}[seen["seen"]]
        lines.append(f"evaluation crops: {verdict} ({seen['note']})")
    if "classifier" in results:
        head_scores = results["classifier"]
        lines.append("classifier head: " + "  ".join(f"{k} {head_scores[k]:.3f}" for k in PROBE_KEYS
                                                     if head_scores.get(k) is not None))
    return "\n".join(lines)
