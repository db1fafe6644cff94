"""A run directory as one self-contained HTML page: ``sslkit report RUN_DIR`` -> ``RUN_DIR/report.html``.

Everything is inside the file (CSS inline, plots as base64 PNG), so it opens offline, can be
mailed, and stays readable when the run directory moves. It reads what ``sslkit evaluate``
wrote (``eval/metrics.json`` with its list of figures, ``eval/classification.json``), what
``sslkit mil`` wrote (``eval/mil/``: ``sslkit.slides.mil_report``; a run directory may hold either
or both) and the training log (``metrics.jsonl``, ``config.yaml``); nothing is recomputed except
the training curves when evaluation did not draw them. Where the method has published figures
(as the papers report them), they are shown beside the run's own, with the paper's dataset named.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from sslkit.atomic import write_text
from sslkit.config import ConfigError
from sslkit.errors import MissingInput

CLUSTER_COLS = ("ami", "ari", "nmi", "purity", "acc", "f1")
PROBE_COLS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc")

# Published figures, keyed by the pretraining method. Each row: what and on which data,
# then the values in this report's columns ("cluster.ami", "classifier.accuracy", ...).
PAPERS: dict[str, list[tuple[str, dict[str, float]]]] = {
    "ccrl": [
        ("CCRL paper, CoNSeP, 500 GPU epochs (Table 2)", {"cluster.ami": 0.242, "cluster.ari": 0.217,
                                                           "cluster.purity": 0.518}),
        ("CCRL paper, NuCLS (Table 2)", {"cluster.ami": 0.228, "cluster.ari": 0.240, "cluster.purity": 0.683}),
    ],
    "supcam": [("SupCAM paper, ChrCluster, ResNeXt101 fine-tuned (Table 1)", {"classifier.accuracy": 0.9499}),
               ("SupCAM paper, ChrCluster, ResNet50 fine-tuned (Table 2)", {"classifier.accuracy": 0.9356})],
    "simclr": [("SSCL paper, MHIST, ResNet-50 fine-tuned", {"classifier.accuracy": 0.8586})],
    "autoencoder": [
        ("DCAE paper, breast IDC 50x50, conv AE without max-pool (Table 1)", {"cluster.f1": 0.651,
                                                                              "cluster.acc": 0.747}),
        ("DCAE paper, raw-pixel k-means (Table 1)", {"cluster.f1": 0.593, "cluster.acc": 0.714}),
    ],
}

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;
  color:#1b1b1b;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.sub{color:#555} table{border-collapse:collapse;margin:.6rem 0}
th,td{padding:.3rem .6rem;border-bottom:1px solid #e5e5e5;text-align:right}
th:first-child,td:first-child{text-align:left} thead th{background:#f4f4f4;text-align:center}
tr.paper td{color:#5a5a5a;font-style:italic}
tr.ours td{font-weight:600} figure{margin:1.2rem 0} figure img{max-width:100%;border:1px solid #e5e5e5}
figcaption{color:#444;font-size:.92rem;margin-top:.3rem}
pre{background:#f7f7f7;padding:.8rem;overflow:auto;font-size:.85rem}
.note{color:#555;font-size:.92rem}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "&mdash;"


def _get(block: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(block, dict) or part not in block:
            return None
        block = block[part]
    return block


def _pretraining_method(cfg: dict[str, Any]) -> str:
    """The method whose paper applies: a fine-tuned run's pretraining method, else its own."""
    name = cfg.get("method", {}).get("name", "")
    init = cfg.get("finetune", {}).get("init")
    if name == "finetune" and init and (Path(init) / "config.yaml").is_file():
        parent = yaml.safe_load((Path(init) / "config.yaml").read_text()) or {}
        return parent.get("method", {}).get("name", name)
    return name


def _metrics_table(metrics: dict[str, Any], cfg: dict[str, Any]) -> str:
    """Rows: this run, its baselines, the paper's figures; columns: clustering, kNN, probe, classifier."""
    cols = ([f"cluster.{c}" for c in CLUSTER_COLS] + ["knn.top1"] + [f"probe.{c}" for c in ("accuracy", "f1", "auc")]
            + ([f"classifier.{c}" for c in ("accuracy", "f1", "auc")] if "classifier" in metrics else []))
    heads = {"cluster": "k-means", "knn": "kNN", "probe": "linear probe", "classifier": "classifier head"}
    label = f"{metrics.get('method', 'run')} ({metrics.get('encoder', '')} encoder)"
    rows = [("ours", label, metrics)]
    for key, name in (("random_init", "random-init backbone"), ("raw_pixels", "raw pixels"),
                      ("morphology", "morphology features")):
        if key in metrics.get("baselines", {}):
            rows.append(("baseline", name, metrics["baselines"][key]))
    for name, values in PAPERS.get(_pretraining_method(cfg), []):
        rows.append(("paper", name, {col: values[col] for col in values}))
    groups: list[list[str]] = []  # runs of columns under one group heading
    for col in cols:
        if groups and groups[-1][0].split(".")[0] == col.split(".")[0]:
            groups[-1].append(col)
        else:
            groups.append([col])
    out = ["<table id='metrics'><thead><tr><th rowspan='2'></th>"]
    out += [f"<th colspan='{len(g)}'>{_esc(heads[g[0].split('.')[0]])}</th>" for g in groups]
    out.append("</tr><tr>")
    out += [f"<th>{_esc(c.split('.')[1].upper())}</th>" for c in cols]
    out.append("</tr></thead><tbody>")
    for kind, name, block in rows:
        cells = "".join(f"<td>{_fmt(block.get(c) if kind == 'paper' else _get(block, c))}</td>" for c in cols)
        out.append(f"<tr class='{kind}'><td>{_esc(name)}</td>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _classification_section(eval_dir: Path) -> str:
    path = eval_dir / "classification.json"
    if not path.is_file():
        return ""
    report = json.loads(path.read_text())
    rows = "".join(
        f"<tr><td>{_esc(name)}</td>" + "".join(f"<td>{_fmt(row[c])}</td>" for c in
                                               ("precision", "sensitivity", "specificity", "f1"))
        + f"<td>{row['support']}</td></tr>" for name, row in report["per_class"].items())
    return (f"<h2>Classifier head on {report['num_samples']} held-out crops</h2>"
            "<table id='per-class'><thead><tr><th>class</th><th>precision</th><th>sensitivity</th>"
            f"<th>specificity</th><th>F1</th><th>support</th></tr></thead><tbody>{rows}</tbody></table>")


def _image(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figures_section(run_dir: Path, figures: list[dict[str, str]]) -> str:
    parts = []
    for fig in figures:
        path = run_dir / "eval" / fig["file"]
        if not path.is_file():
            parts.append(f"<p class='note'>Figure '{_esc(fig['file'])}' is missing; run `sslkit evaluate` again.</p>")
            continue
        parts.append(f"<figure id='fig-{_esc(fig['name'])}'><img alt='{_esc(fig['title'])}' src='{_image(path)}'>"
                     f"<figcaption><b>{_esc(fig['title'])}.</b> {_esc(fig.get('caption', ''))}</figcaption></figure>")
    return "".join(parts)


def _online_section(run_dir: Path) -> str:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return ""
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "online/knn_top1" in record:
            last = record
    if not last:
        return ""
    return (f"<p class='note'>Online evaluation at step {last['step']}: kNN top-1 {_fmt(last['online/knn_top1'])}, "
            f"k-means AMI {_fmt(last['online/ami'])}, ARI {_fmt(last['online/ari'])}; it took "
            f"{100 * last['online/eval_share']:.1f} % of the wall time since the previous evaluation.</p>")


def _curves(run_dir: Path, figures: list[dict[str, str]], cfg: dict[str, Any]) -> list[dict[str, str]]:
    """The training curves, drawn here when evaluation did not (e.g. ``eval.plots=false``)."""
    if any(fig["name"] == "curves" for fig in figures):
        return figures
    from sslkit.evaluate.figures import curves_figure

    curves = curves_figure(run_dir, online=bool(cfg.get("train", {}).get("eval_every")))
    return figures if curves is None else [curves, *figures]


def _seen_note(metrics: dict) -> str:
    """Whether the evaluated crops were seen in training (``sslkit.evaluate.overlap``), said first."""
    seen = metrics.get("seen_in_training")
    if not seen:
        return ""
    head = {"all": "Seen in training.", "partly": "Partly seen in training.", "no": "Unseen in training.",
            "unknown": "Seen in training: unknown."}[seen["seen"]]
    style = "" if seen["seen"] == "no" else " style='color:#a40000'"
    return f"<p class='note seen'{style}><b>{head}</b> The evaluation crops: {_esc(seen['note'])}.</p>"


def _knn_search_note(knn: dict[str, Any]) -> str:
    """", approximate search (...)" when the kNN searched an index rather than all pairs (large sets)."""
    if knn.get("search", "exact") == "exact":
        return ""
    return (f", approximate search ({_esc(knn['search'])}, recall@{knn['k']} {knn['recall_at_k']:.3f} against exact "
            f"search on {knn['recall_queries']} sampled crops)")


def _evaluation_body(run_dir: Path, metrics: dict[str, Any], cfg: dict[str, Any], name: str, git: str) -> list[str]:
    """The page's sections on what ``sslkit evaluate`` wrote."""
    figures = _curves(run_dir, metrics.get("figures", []), cfg)
    probe = metrics.get("probe", {})
    return [
        f"<h1>{_esc(name)}: {_esc(metrics.get('method', ''))}</h1>",
        f"<p class='sub'>Step {metrics.get('step')} &middot; git {_esc(git)} &middot; "
        f"{metrics.get('num_samples')} evaluation crops from {_esc(metrics.get('shards', ''))} &middot; "
        f"classes: {_esc(', '.join(metrics.get('classes', [])))}</p>",
        "<h2>Metrics</h2>", _seen_note(metrics), _metrics_table(metrics, cfg),
        f"<p class='note'>k-means with k = {metrics['cluster']['k']} on L2-normalised features (raw pixels as they "
        f"are); kNN: cosine, k = {metrics['knn']['k']}, leave-one-out{_knn_search_note(metrics['knn'])}; "
        "linear probe: logistic regression, "
        f"{_esc(probe.get('protocol', 'not run'))}. Paper rows are the published figures on the paper's own data "
        "and budget, for orientation only.</p>",
        _online_section(run_dir), _classification_section(run_dir / "eval"),
        "<h2>Figures</h2>", _figures_section(run_dir, figures),
    ]


def write_report(run_dir: str | Path, *, out: Optional[Path] = None) -> Path:
    """Write ``report.html`` for a run evaluated with ``sslkit evaluate`` and/or ``sslkit mil``; returns its path."""
    from sslkit.slides.mil_report import mil_section

    run_dir = Path(run_dir)
    metrics_path = run_dir / "eval" / "metrics.json"
    has_mil = (run_dir / "eval" / "mil" / "metrics.json").is_file()
    if not metrics_path.is_file() and not has_mil:
        raise MissingInput(f"No {metrics_path}; run `sslkit evaluate {run_dir}` first (or `sslkit mil CONFIG` for "
                           "slide classification), then `sslkit report`.")
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    cfg = yaml.safe_load(config_text) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{run_dir / 'config.yaml'} is not a config mapping; it was not written by sslkit.")
    git = config_text.splitlines()[0].removeprefix("# git: ") if config_text.startswith("# git:") else "unknown"
    name = cfg.get("run", {}).get("name", run_dir.name)
    if metrics_path.is_file():
        body = _evaluation_body(run_dir, json.loads(metrics_path.read_text()), cfg, name, git)
    else:  # a slide-classification run: no pretraining, no crop-level evaluation
        body = [f"<h1>{_esc(name)}: slide classification</h1>", f"<p class='sub'>git {_esc(git)}</p>"]
    body += [mil_section(run_dir),
             f"<h2>Configuration</h2><details><summary>config.yaml</summary><pre>{_esc(config_text)}</pre></details>"]
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>sslkit report: {_esc(name)}</title><style>{_CSS}</style></head><body>"
            + "".join(body) + "</body></html>")
    out = Path(out or run_dir / "report.html")
    return write_text(out, page)
