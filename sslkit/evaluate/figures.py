"""The figures of an evaluated run, drawn into ``eval/`` (``sslkit evaluate`` calls ``make_figures``).

Each figure is listed as ``{"name", "file", "title", "caption"}`` in ``eval/metrics.json``
(``figures``), which the HTML report and the tracker read. A figure that cannot be drawn is
skipped with a warning naming it and why: the metrics are already on disk by then.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from torch import nn

from sslkit.config import Config
from sslkit.data.stream import ShardSet
from sslkit.embed import load_crops
from sslkit.evaluate import gallery, plots

log = logging.getLogger(__name__)


def classifier_net(method: nn.Module) -> Optional[nn.Module]:
    """images -> logits with gradients flowing through the backbone (Grad-CAM needs them even when
    fine-tuning froze it); None for methods without a classifier head."""
    if hasattr(method, "head") and hasattr(method, "backbone"):  # fine-tuned runs
        return nn.Sequential(method.backbone, method.head)
    if hasattr(method, "classifier") and hasattr(method, "encoder"):  # SCL: backbone -> E -> classifier
        return nn.Sequential(method.encoder, method.classifier)
    return None


def _gallery(run_dir: Path, cfg: Config, test: ShardSet, kept: dict[str, Any]) -> dict[str, str]:
    picks, titles = gallery.gallery_picks(kept["assign"], labels=kept["labels"], classes=kept["classes"],
                                        per_cluster=cfg.eval.gallery, seed=cfg.run.seed)
    keys = kept["keys"]
    crops = load_crops(test, {keys[i] for p in picks for i in p}, size=cfg.data.size, channels=cfg.data.channels,
                       workers=cfg.data.workers, max_samples=cfg.eval.max_samples)
    empty = np.zeros((0, cfg.data.size, cfg.data.size, cfg.data.channels), np.uint8)
    images = [np.stack([crops[keys[i]] for i in pick]) if len(pick) else empty for pick in picks]
    gallery.cluster_gallery(images, titles=titles, out=run_dir / "eval" / "gallery.png")
    return {"name": "gallery", "file": "gallery.png", "title": "Crops per cluster",
            "caption": f"Up to {cfg.eval.gallery} randomly drawn crops of each k-means cluster, with the cluster's "
                       "size and its most frequent true class; rows in the order of the cluster confusion matrix."}


def _gradcam(run_dir: Path, cfg: Config, test: ShardSet, head: dict[str, Any], method: nn.Module) -> Optional[dict]:
    from sslkit.evaluate import gradcam

    net = classifier_net(method)
    if net is None:
        return None
    probs, labels, keys = head["probs"], head["labels"], head["keys"]
    picks = gradcam.pick_examples(labels, probs.argmax(1), probs, n=16, seed=cfg.run.seed)
    crops = load_crops(test, {keys[i] for i in picks}, size=cfg.data.size, channels=cfg.data.channels,
                       workers=cfg.data.workers, max_samples=cfg.eval.max_samples)
    gradcam.explain(net, np.stack([crops[keys[i]] for i in picks]), labels=labels[picks], classes=head["classes"],
                    out=run_dir / "eval" / "gradcam.png")
    return {"name": "gradcam", "file": "gradcam.png", "title": "Grad-CAM of the classifier head",
            "caption": "Where the classifier looked for its predicted class (Grad-CAM on the last convolutional "
                       "map); the box surrounds the most influential region (at least half the peak). Confident "
                       "mistakes first, then a random sample of correct predictions."}


def make_figures(run_dir: Path, cfg: Config, test: ShardSet, kept: dict[str, Any], method: nn.Module) -> list[dict]:
    """Draw every figure that applies; return their descriptions (see the module docstring)."""
    ev, eval_dir = cfg.eval, run_dir / "eval"
    classes, labels, assign = kept["classes"], kept["labels"], kept["assign"]
    n = len(labels)
    makers: list[tuple[str, Callable[[], Optional[dict[str, str]]]]] = [
        ("curves", lambda: None if plots.training_curves(run_dir / "metrics.jsonl", eval_dir / "curves.png") is None
         else {"name": "curves", "file": "curves.png", "title": "Training curves",
               "caption": "Loss, learning rate and throughput against optimiser step"
                          + (", with the online evaluation" if cfg.train.eval_every else "") + "."}),
        ("embedding_map", lambda: (plots.embedding_map(kept["feats"], labels, assign, classes=classes,
                                                       out=eval_dir / "embedding_map.png", method=ev.projection,
                                                       seed=cfg.run.seed), {
            "name": "embedding_map", "file": "embedding_map.png",
            "title": f"{dict(umap='UMAP', tsne='t-SNE')[ev.projection]} of the {ev.encoder} encoder's features",
            "caption": f"{n} evaluation crops, coloured by true class (left) and by k-means cluster (right)."})[1]),
        ("cluster_confusion", lambda: (plots.cluster_confusion(labels, assign, classes=classes,
                                                               out=eval_dir / "cluster_confusion.png"), {
            "name": "cluster_confusion", "file": "cluster_confusion.png", "title": "Classes against k-means clusters",
            "caption": "Each cluster is placed under the class the Hungarian assignment matched it to; "
                       "the diagonal holds the crops counted as correct by the unsupervised accuracy."})[1]),
    ]
    if "probe" in kept:
        cm = np.asarray(kept["probe"]["confusion_matrix"])
        makers.append(("probe_confusion", lambda: (plots.confusion_plot(
            cm, row_names=classes, col_names=classes, out=eval_dir / "probe_confusion.png",
            title=f"Linear probe, {kept['probe']['protocol']}", xlabel="predicted", ylabel="true"), {
            "name": "probe_confusion", "file": "probe_confusion.png", "title": "Linear probe confusion matrix",
            "caption": f"Logistic regression on frozen features ({kept['probe']['protocol']}); rows true class, "
                       "columns predicted, shading row-normalised."})[1]))
    if "classifier" in kept:
        head = kept["classifier"]
        makers.append(("classifier_confusion", lambda: (plots.confusion_plot(
            np.asarray(head["confusion_matrix"]), row_names=head["classes"], col_names=head["classes"],
            out=eval_dir / "classifier_confusion.png", title="Classifier head", xlabel="predicted", ylabel="true"), {
            "name": "classifier_confusion", "file": "classifier_confusion.png",
            "title": "Classifier head confusion matrix",
            "caption": "The run's own classifier on the evaluation crops; rows true class, columns predicted."})[1]))
        makers.append(("gradcam", lambda: _gradcam(run_dir, cfg, test, head, method)))
    makers.append(("gallery", lambda: _gallery(run_dir, cfg, test, kept)))
    figures = []
    for name, make in makers:
        try:
            fig = make()
        except Exception as err:  # a figure must never cost the metrics already written
            log.warning("Figure '%s' was not drawn: %s", name, err)
            print(f"sslkit: figure '{name}' was not drawn ({type(err).__name__}: {err}).")
            continue
        if fig is not None:
            figures.append(fig)
    return figures
