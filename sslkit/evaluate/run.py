"""Evaluate a run directory: embed the evaluation shards with the trained encoder and with the
two baselines every report carries (raw pixels, a randomly initialised backbone); score each
with k-means (AMI, ARI, NMI, purity, Hungarian accuracy, F1), kNN top-1 and a linear probe;
add the run's own classifier head when it has one; draw the plots; write ``eval/`` and log it
all to the run's tracker.

    results = evaluate_run("runs/demo")            # eval/metrics.json, eval/*.png, ...
    print(format_table(results))
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate.utils import set_seed

from sslkit import dist
from sslkit.atomic import write_json
from sslkit.config import Config, ConfigError, EvalConfig, apply_overrides
from sslkit.data.augment import to_pixels
from sslkit.data.shardset import ShardSet, resolve_shards
from sslkit.embed import embed_shards, save_embeddings
from sslkit.evaluate.morphology import morphology_features, standardize
from sslkit.evaluate.overlap import training_overlap
from sslkit.evaluate.probe import PROBE_KEYS, classify_shards, cv_probe, linear_probe
from sslkit.evaluate.scores import score_embeddings
from sslkit.methods import Method, build_method
from sslkit.rundir import eval_shards, load_trained

Embedder = Callable[[torch.Tensor], torch.Tensor]


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
    scores = score_embeddings(feats, labels, k=ev.k or None, restarts=ev.restarts, niter=ev.niter, seed=seed,
                              kmeans_max_train=ev.kmeans_max_train, normalize=normalize, whiten_dims=ev.whiten,
                              knn_k=ev.knn_k, knn_tau=ev.knn_tau, knn_exact_max=ev.knn_exact_max)
    block: dict[str, Any] = dict(scores.blocks)
    extra: dict[str, Any] = {"assign": scores.assign, "seconds": dict(scores.seconds)}
    start = time.perf_counter()
    if ev.probe:
        if train is not None and (train[1] >= 0).all():
            report = linear_probe(train[0], train[1], feats, labels, classes=classes, seed=seed)
        else:
            report = cv_probe(feats, labels, classes=classes, seed=seed)
        block["probe"] = {**{key: report["probe"][key] for key in PROBE_KEYS if key in report["probe"]},
                          "protocol": report["protocol"], "train_samples": report["train_samples"]}
        extra["probe"] = report
    extra["seconds"]["probe_s"] = time.perf_counter() - start
    return block, extra


def _embedders(cfg: Config, method: Method, device: str) -> dict[str, Embedder]:
    ev = cfg.eval
    embedders: dict[str, Embedder] = {"trained": lambda x: method.embed(x, encoder=ev.encoder, features=ev.features)}
    if ev.baselines:
        set_seed(cfg.run.seed + 1)
        fresh = build_method(type(method).untrained_config(cfg)).eval().to(device)
        embedders["random_init"] = lambda x: fresh.embed(x, encoder="query", features=ev.features)
        embedders["raw_pixels"] = lambda x: x.flatten(1)
    if ev.morphology:
        embedders["morphology"] = lambda x: torch.from_numpy(morphology_features(to_pixels(x).cpu().numpy()))
    return embedders


def _launched_device() -> str:
    """Under ``accelerate launch``/torchrun, join the process group (each rank then embeds its share)
    and use this rank's device; alone, the GPU if there is one."""
    if dist.env_world_size() > 1 and not dist.is_distributed():
        from accelerate import PartialState

        return str(PartialState(cpu=not torch.cuda.is_available()).device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_run(run_dir: str | Path, *, shards: Optional[str] = None, split: Optional[str] = None,
                 overrides: tuple[str, ...] | list[str] = (), device: Optional[str] = None) -> dict[str, Any]:
    """Evaluate the newest checkpoint of ``run_dir``; returns what ``eval/metrics.json`` holds (on the
    main process; under ``accelerate launch`` the other ranks help embed and return early parts only)."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    cfg, method, state = load_trained(run_dir)
    cfg = apply_overrides(cfg, overrides)
    ev = cfg.eval
    spec = eval_shards(cfg, shards=shards, split=split)
    device = device or _launched_device()
    test = resolve_shards(spec)
    train_set, probe_note = _probe_training_set(cfg, test, spec) if ev.probe else (None, "")
    method.to(device)

    results: dict[str, Any] = {"method": cfg.method.name.upper(), "encoder": ev.encoder, "features": ev.features,
                               "momentum_encoder": method.momentum_encoder,
                               "step": state["step"], "checkpoint": state["checkpoint"], "shards": spec}
    if dist.is_main_process():
        results["seen_in_training"] = training_overlap(cfg.data.shards, test, train_manifest=cfg.data.manifest)
    scoring = _Scoring(cfg, test, spec, train_set, device, classes=test.classes or [],
                       scratch=run_dir / "eval" / SCRATCH)
    try:
        kept = _score_all(scoring, results, cfg, method, device, probe_note=probe_note if train_set is None else "")
        if method.has_classifier:  # a classifier head (SCL, fine-tuned runs): its test metrics too
            start = time.perf_counter()
            kept["classifier"] = classify_shards(cfg, method, state, test, run_dir=run_dir, device=device)
            results["classifier"] = {key: kept["classifier"]["probe"][key] for key in PROBE_KEYS
                                     if key in kept["classifier"]["probe"]}
            scoring.timings["classifier_s"] = time.perf_counter() - start
        if dist.is_main_process():
            out = run_dir / "eval"
            results["timings"] = _timings(scoring.timings, started)
            _write(out, results, kept)
            start = time.perf_counter()
            results["figures"] = _figures(run_dir, cfg, test, kept, method) if ev.plots else []
            results["timings"] = _timings({**scoring.timings, "plots_s": time.perf_counter() - start}, started)
            write_json(out / "metrics.json", results)
            _log(run_dir, cfg, state, results)
    finally:
        if dist.is_main_process():  # the embeddings of the baselines, and anything a failure left behind
            shutil.rmtree(run_dir / "eval" / SCRATCH, ignore_errors=True)
    return results


SCRATCH = ".embedding"  # eval/.embedding/: embeddings being made and scored; removed at the end


def _score_all(scoring: _Scoring, results: dict[str, Any], cfg: Config, method: Method, device: str, *,
               probe_note: str) -> dict[str, Any]:
    """Embed and score with every embedder into ``results``; return what the figures need (main process)."""
    kept: dict[str, Any] = {}
    for name, fn in _embedders(cfg, method, device).items():
        scored = scoring.score(name, fn)
        if scored is None:  # not the main process: it embedded its share
            continue
        block, arrays = scored
        if name == "trained":
            if "probe" in block and probe_note:
                block["probe"]["note"] = f"cross-validated: {probe_note}"
            results.update(block)
            results.update(num_samples=int(len(arrays["labels"])), classes=arrays["classes"])
            kept = arrays
        else:
            results.setdefault("baselines", {})[name] = block
            results["baseline_samples"] = scoring.baseline_rows
    return kept


def _timings(stages: dict[str, Any], started: float) -> dict[str, Any]:
    """The ``timings`` block: wall seconds per stage, the total so far, and the peak resident memory of
    this process and of its largest finished child (DataLoader workers), in GB (``ru_maxrss``)."""
    import resource

    gb = 1024 ** 2  # ru_maxrss is in KiB on Linux
    return {**stages, "total_s": time.perf_counter() - started,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / gb,
            "peak_rss_children_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / gb}


_LABELS = {"trained": "{} encoder", "random_init": "random init", "raw_pixels": "raw pixels",
           "morphology": "morphology"}


class _Scoring:
    """Embeds the evaluation shards (and the probe's training shards) with one embedder and scores them.

    The evaluation crops stream to ``scratch`` (``embed_shards(out=...)``). The baselines embed only a
    seeded sample of ``eval.baseline_samples`` of the crops the trained encoder saw, the same for each,
    so raw pixels of a million crops (12 GB) are never made. ``timings`` collects the wall seconds of
    every stage: the trained encoder's at the top, each baseline's under ``baselines`` and their sum."""

    def __init__(self, cfg: Config, test: ShardSet, spec: str, train_set: Optional[ShardSet], device: str, *,
                 classes: list[str], scratch: Path) -> None:
        self.cfg, self.test, self.spec, self.train_set, self.classes = cfg, test, spec, train_set, classes
        self.scratch, self.baseline_keys, self.baseline_rows = scratch, None, 0
        self.timings: dict[str, Any] = {}
        self.common = dict(size=cfg.data.size, channels=cfg.data.channels, batch_size=cfg.eval.batch_size,
                           workers=cfg.data.workers, device=device)

    def score(self, name: str, fn: Embedder) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
        """The metrics block of embedder ``name`` and the arrays the figures need (main process only)."""
        ev, label = self.cfg.eval, _LABELS[name].format(self.cfg.eval.encoder)
        start = time.perf_counter()
        feats, labels, keys = embed_shards(fn, self.test, desc=f"embed ({label})", max_samples=ev.max_samples,
                                           out=self.scratch / f"{name}.npy",
                                           keep=None if name == "trained" else self.baseline_keys, **self.common)
        if (labels < 0).all():
            raise ConfigError(f"The evaluation shards at '{self.spec}' carry no labels ('{self.cfg.data.labels}' "
                              "field); point eval.shards (or --shards) at labelled shards.")
        if name == "trained":
            self.baseline_keys, self.baseline_rows = _baseline_sample(keys, ev.baseline_samples, seed=self.cfg.run.seed)
        embed_s = time.perf_counter() - start
        self.classes = self.classes or [str(c) for c in range(int(labels.max()) + 1)]
        start = time.perf_counter()
        train = None
        if self.train_set is not None:
            tx, ty, _ = embed_shards(fn, self.train_set, desc=f"embed probe set ({label})",
                                     max_samples=ev.probe_samples, **self.common)
            train = (tx, ty)
        probe_embed_s = time.perf_counter() - start
        if not dist.is_main_process():  # every rank embeds its share; the main process scores them all
            return None
        if name == "morphology":  # features of different units: z-scores (with the evaluated set's statistics)
            feats, *probe_feats = standardize(feats, *([train[0]] if train is not None else []))
            train = (probe_feats[0], train[1]) if train is not None else None
        block, extra = _score(feats, labels, train, ev, classes=self.classes, seed=self.cfg.run.seed,
                              normalize=ev.normalize and name not in ("raw_pixels", "morphology"))
        seconds = {"embed_s": embed_s, **extra.pop("seconds")}
        seconds["probe_s"] += probe_embed_s  # embedding the probe's training crops is the probe's cost
        self._add_timings(name, seconds)
        # raw pixels of a large set are big: only the trained encoder's features are kept
        arrays = {"feats": feats, "feats_file": self.scratch / "trained.npy", "labels": labels, "keys": keys,
                  "classes": self.classes, **extra} if name == "trained" else {}
        return block, arrays

    def _add_timings(self, name: str, seconds: dict[str, float]) -> None:
        if name == "trained":
            self.timings.update(seconds)
            return
        self.timings.setdefault("baselines", {})[name] = seconds
        self.timings["baselines_s"] = sum(sum(stage.values()) for stage in self.timings["baselines"].values())


def _baseline_sample(keys: list[str], limit: Optional[int], *, seed: int) -> tuple[Optional[frozenset[str]], int]:
    """The keys of the seeded sample of ``limit`` evaluation crops the baselines are scored on (None: all of
    them, when there are no more than ``limit``) and its size."""
    if limit is None or len(keys) <= limit:
        return None, len(keys)
    rows = np.random.default_rng(seed).choice(len(keys), size=limit, replace=False)
    return frozenset(keys[i] for i in rows), int(limit)


def _figures(run_dir: Path, cfg: Config, test: ShardSet, kept: dict[str, Any], method: torch.nn.Module) -> list[dict]:
    from sslkit.evaluate.figures import make_figures

    return make_figures(run_dir, cfg, test, kept, method)


def _log(run_dir: Path, cfg: Config, state: dict[str, Any], results: dict[str, Any]) -> None:
    from sslkit.tracking import log_evaluation

    images = {fig["name"]: run_dir / "eval" / fig["file"] for fig in results.get("figures", [])}
    metrics = {key: results[key] for key in ("cluster", "knn", "probe", "classifier", "baselines") if key in results}
    log_evaluation(run_dir, cfg, run_id=state.get("run_id"), step=int(state["step"]), metrics=metrics, images=images)


def _write(out: Path, results: dict[str, Any], kept: dict[str, Any]) -> None:
    """The arrays and metrics.json, before the figures (a figure that fails costs no metric)."""
    # the trained encoder's embeddings are a file already: renamed into place, not copied (its memory map stays valid)
    save_embeddings(out, kept["feats_file"], kept["labels"], kept["keys"], clusters=kept["assign"])
    if "probe" in kept:
        write_json(out / "probe.json", kept["probe"])
    write_json(out / "metrics.json", results)


def format_table(results: dict[str, Any]) -> str:
    """One text table: the trained encoder and the baselines, clustering, kNN and probe side by side."""
    # metrics.json of older versions has no momentum_encoder: the methods that had one, by name
    momentum = results.get("momentum_encoder", results.get("method") in ("CCRL", "SUPCAM"))
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
        probe_block = results["probe"]
        lines.append(f"linear probe: {probe_block['protocol']} ({probe_block['train_samples']} training crops)")
    lines += _scale_notes(results)
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


def _scale_notes(results: dict[str, Any]) -> list[str]:
    """Table lines for what large sets change: an approximate kNN search, baselines on a sample."""
    lines, knn = [], results["knn"]
    if knn.get("search", "exact") != "exact":
        breadth = {"hnsw": lambda: f"efSearch {knn['ef_search']}",
                   "lists": lambda: (f"{knn['nlist']} lists, each crop's {knn['probe']} nearest searched, "
                                     f"{100 * knn['searched_share']:.1f} % of the pairs compared"),
                   }.get(knn["search"], lambda: f"{knn['nprobe']} of {knn['nlist']} lists probed")()
        lines.append(f"kNN: approximate search ({knn['search']}, {breadth}), "
                     f"recall@{knn['k']} {knn['recall_at_k']:.3f} against exact search on {knn['recall_queries']} "
                     "sampled crops")
    sampled = results.get("baseline_samples", results["num_samples"])
    if results.get("baselines") and sampled < results["num_samples"]:
        lines.append(f"baselines: scored on a seeded sample of {sampled} of the {results['num_samples']} crops "
                     "(eval.baseline_samples)")
    return lines
