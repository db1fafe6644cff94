"""The figures of an evaluated run, drawn into ``eval/`` (``sslkit evaluate`` calls ``make_figures``).

Each figure is listed as ``{"name", "file", "title", "caption"}`` in ``eval/metrics.json``
(``figures``), which the HTML report and the tracker read. A figure that cannot be drawn is
skipped with a warning naming it and why: the metrics are already on disk by then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sslkit.config import Config
from sslkit.data.shardset import ShardSet
from sslkit.embed import load_crops
from sslkit.evaluate import gallery, plots
from sslkit.methods import Method

log = logging.getLogger(__name__)


def _entry(name: str, title: str, caption: str) -> dict[str, str]:
    """A figure's description; its file is ``eval/<name>.png``."""
    return {"name": name, "file": f"{name}.png", "title": title, "caption": caption}


def _curves_entry(online: bool) -> dict[str, str]:
    return _entry("curves", "Training curves", "Loss, learning rate and throughput against optimiser step"
                  + (", with the online evaluation" if online else "") + ".")


def curves_figure(run_dir: Path, *, online: bool) -> Optional[dict[str, str]]:
    """Draw ``eval/curves.png`` from the training log; its description, or None without a log."""
    drawn = plots.training_curves(run_dir / "metrics.jsonl", run_dir / "eval" / "curves.png")
    return None if drawn is None else _curves_entry(online)


def _gallery(out: Path, cfg: Config, test: ShardSet, kept: dict[str, Any]) -> Path:
    picks, titles = gallery.gallery_picks(kept["assign"], labels=kept["labels"], classes=kept["classes"],
                                          per_cluster=cfg.eval.gallery, seed=cfg.run.seed)
    keys = kept["keys"]
    crops = load_crops(test, {keys[i] for p in picks for i in p}, size=cfg.data.size, channels=cfg.data.channels,
                       workers=cfg.data.workers, max_samples=cfg.eval.max_samples)
    empty = np.zeros((0, cfg.data.size, cfg.data.size, cfg.data.channels), np.uint8)
    images = [np.stack([crops[keys[i]] for i in pick]) if len(pick) else empty for pick in picks]
    return gallery.cluster_gallery(images, titles=titles, out=out)


def _gradcam(out: Path, cfg: Config, test: ShardSet, head: dict[str, Any], method: Method) -> Optional[Path]:
    from sslkit.evaluate import gradcam

    net = method.classifier_net()
    if net is None:
        return None
    probs, labels, keys = head["probs"], head["labels"], head["keys"]
    picks = gradcam.pick_examples(labels, probs.argmax(1), probs, n=16, seed=cfg.run.seed)
    crops = load_crops(test, {keys[i] for i in picks}, size=cfg.data.size, channels=cfg.data.channels,
                       workers=cfg.data.workers, max_samples=cfg.eval.max_samples)
    return gradcam.explain(net, np.stack([crops[keys[i]] for i in picks]), labels=labels[picks],
                           classes=head["classes"], out=out)


def make_figures(run_dir: Path, cfg: Config, test: ShardSet, kept: dict[str, Any], method: Method) -> list[dict]:
    """Draw every figure that applies; return their descriptions (see the module docstring)."""
    ev = cfg.eval
    classes, labels, assign = kept["classes"], kept["labels"], kept["assign"]
    projection = dict(umap="UMAP", tsne="t-SNE")[ev.projection]
    # (description, draw(out path) -> the path, or None when the figure does not apply)
    makers: list[tuple[dict[str, str], Callable[[Path], Optional[Path]]]] = [
        (_curves_entry(bool(cfg.train.eval_every)), lambda out: plots.training_curves(run_dir / "metrics.jsonl", out)),
        (_entry("embedding_map", f"{projection} of the {ev.encoder} encoder's features",
                f"{len(labels)} evaluation crops, coloured by true class (left) and by k-means cluster (right)."),
         lambda out: plots.embedding_map(kept["feats"], labels, assign, classes=classes, out=out,
                                         method=ev.projection, seed=cfg.run.seed)),
        (_entry("cluster_confusion", "Classes against k-means clusters",
                "Each cluster is placed under the class the Hungarian assignment matched it to; the diagonal "
                "holds the crops counted as correct by the unsupervised accuracy."),
         lambda out: plots.cluster_confusion(labels, assign, classes=classes, out=out)),
    ]
    if "probe" in kept:
        protocol = kept["probe"]["protocol"]
        makers.append((_entry("probe_confusion", "Linear probe confusion matrix",
                              f"Logistic regression on frozen features ({protocol}); rows true class, columns "
                              "predicted, shading row-normalised."),
                       lambda out: plots.confusion_plot(np.asarray(kept["probe"]["confusion_matrix"]),
                                                        row_names=classes, col_names=classes, out=out,
                                                        title=f"Linear probe, {protocol}", xlabel="predicted",
                                                        ylabel="true")))
    if "classifier" in kept:
        head = kept["classifier"]
        makers.append((_entry("classifier_confusion", "Classifier head confusion matrix",
                              "The run's own classifier on the evaluation crops; rows true class, columns predicted."),
                       lambda out: plots.confusion_plot(np.asarray(head["confusion_matrix"]), row_names=head["classes"],
                                                        col_names=head["classes"], out=out, title="Classifier head",
                                                        xlabel="predicted", ylabel="true")))
        makers.append((_entry("gradcam", "Grad-CAM of the classifier head",
                              "Where the classifier looked for its predicted class (Grad-CAM on the last "
                              "convolutional map); the box surrounds the most influential region (at least half "
                              "the peak). Confident mistakes first, then a random sample of correct predictions."),
                       lambda out: _gradcam(out, cfg, test, head, method)))
    makers.append((_entry("gallery", "Crops per cluster",
                          f"Up to {ev.gallery} randomly drawn crops of each k-means cluster, with the cluster's size "
                          "and its most frequent true class; rows in the order of the cluster confusion matrix."),
                   lambda out: _gallery(out, cfg, test, kept)))
    figures = []
    for entry, draw in makers:
        name = entry["name"]
        try:
            drawn = draw(run_dir / "eval" / entry["file"])
        except Exception as err:  # noqa: BLE001 -- a figure must never cost the metrics already written
            log.warning("Figure '%s' was not drawn: %s", name, err)
            print(f"sslkit: figure '{name}' was not drawn ({type(err).__name__}: {err}).")
            continue
        if drawn is not None:
            figures.append(entry)
    return figures
