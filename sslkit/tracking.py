"""Side effects of the main process: metrics.jsonl always, plus an Accelerate tracker.

Weights & Biases runs offline unless ``tracker.mode=online`` and an API key is set;
``tracker.name=none`` turns trackers off (``metrics.jsonl`` is still written).

W&B and resuming: the run id is saved in every checkpoint and passed back with
``resume="allow"``, so a resumed run logs to the same W&B run. Offline, each process
writes its own ``RUN/wandb/offline-run-*-<id>/`` folder with the same id; its history
continues at the resumed step because every row is logged with the training step.
``wandb sync RUN/wandb/offline-run-*`` (wandb >= 0.30) replays the folders of one id in
start-time order, each resuming the run. Evaluation (:func:`log_evaluation`) re-opens
the same run the same way.

Layout: ``metrics.jsonl`` keeps flat keys (``loss``, ``pairs_per_s``, ``health/std``, ...:
what the plots, the report and the benchmarks read); the trackers get them in groups, named
by :func:`tracker_key` alone: ``train/`` (what the optimisation did: loss, lr, grad_norm,
the method's own scalars, loss_chance, skipped steps, bad data), ``system/`` (what the
machine and the data path did: :data:`SYSTEM`), and the keys that carry a group already
(``health/``, ``online/``, ``eval/``). W&B plots every group against ``train/step`` (the
optimizer step) and offers ``system/wall_time_s`` (seconds of training, resumed runs
continuing) as a wall-time axis; TensorBoard has both axes built in. Alerts
(:meth:`RunLogger.alert`) go to ``alerts.jsonl``, the log, W&B's alerts and TensorBoard text.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from accelerate import Accelerator

from sslkit import dist
from sslkit.config import Config, TrackerConfig, git_sha, to_dict

if TYPE_CHECKING:
    from sslkit.alerts import Alert

log = logging.getLogger(__name__)

# Flat metrics.jsonl keys that trackers show under system/; every other key without a group goes to train/.
SYSTEM = frozenset({"pairs_per_s", "data_wait_share", "mem_peak_gb", "wall_time_s", "replicas_identical",
                    "replicas"})
GROUPS = ("train", "health", "online", "system")  # plotted against STEP_KEY in W&B
STEP_KEY = "train/step"
PROJECTOR_ROWS = 2000  # evaluated embeddings sampled (seeded by run.seed) into W&B's table and TensorBoard's projector


def tracker_key(key: str) -> str:
    """The name a tracker shows for a ``metrics.jsonl`` key: ``loss`` -> ``train/loss``,
    ``pairs_per_s`` -> ``system/pairs_per_s``; a key with a group (``health/std``) stays."""
    if "/" in key:
        return key
    return f"system/{key}" if key in SYSTEM else f"train/{key}"


def tracker_backend(cfg: TrackerConfig) -> str | None:
    """The ``log_with`` argument for ``Accelerator``."""
    return None if cfg.name == "none" else cfg.name


def _wandb_mode(cfg: TrackerConfig) -> str:
    if cfg.mode == "online" and not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
        log.warning("tracker.mode=online but no WANDB_API_KEY is set: logging to W&B offline instead.")
        return "offline"
    return cfg.mode


def tracker_config(cfg: Config) -> dict[str, Any]:
    """What the tracker records as the run's config: the resolved config and the git commit."""
    return {**to_dict(cfg), "git": git_sha()}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix/a/b": 1}``, every leaf kept as it is."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def numeric_leaves(tree: Mapping[str, Any], prefix: str = "eval") -> dict[str, float | int]:
    """The numbers of a nested dict (``eval/metrics.json``) as flat ``prefix/a/b`` keys.

    Strings (notes, protocol names), lists and None are left out: trackers plot numbers."""
    out: dict[str, float | int] = {}
    for name, value in flatten(tree, prefix).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        out[name] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's ``add_hparams`` takes flat int/float/str/bool values only."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(config).items()}


class RunLogger:
    """Writes ``metrics.jsonl`` in the run directory and forwards to the Accelerate tracker."""

    def __init__(self, accelerator: Accelerator, cfg: Config, *, run_dir: Path, run_id: str | None = None) -> None:
        self.accelerator, self.cfg, self.run_dir = accelerator, cfg, run_dir
        self.run_id = run_id
        self.path = run_dir / "metrics.jsonl"

    def start(self) -> None:
        if self.cfg.tracker.name == "none":
            return
        config = tracker_config(self.cfg)
        init_kwargs: dict[str, Any] = {}
        if self.cfg.tracker.name == "wandb":
            os.environ.setdefault("WANDB_SILENT", "true")
            # Resuming passes the stored id, so W&B continues the same run.
            init_kwargs["wandb"] = {"dir": str(self.run_dir), "id": self.run_id, "resume": "allow",
                                    "name": self.cfg.run.name, "mode": _wandb_mode(self.cfg.tracker)}
        elif self.cfg.tracker.name == "tensorboard":
            config = _hparams(config)
        self.accelerator.init_trackers(self.cfg.tracker.project, config=config, init_kwargs=init_kwargs)
        if self.cfg.tracker.name == "wandb" and self.accelerator.is_main_process:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            self.run_id = run.id
            run.define_metric(STEP_KEY)
            for group in GROUPS:  # each group's charts against the optimizer step, whatever W&B's own step is
                run.define_metric(f"{group}/*", step_metric=STEP_KEY)

    def log(self, values: dict[str, Any], *, step: int) -> None:
        """One row: flat keys to ``metrics.jsonl``, grouped ones (:func:`tracker_key`) to the tracker."""
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.cfg.tracker.name != "none":
            row = {tracker_key(k): v for k, v in clean.items()}
            if self.cfg.tracker.name == "wandb":
                row[STEP_KEY] = step
            self.accelerator.log(row, step=step)

    def alert(self, alert: Alert) -> None:
        """An alert that fired (main process): a log warning, a line of ``alerts.jsonl`` and the tracker's
        own alert (W&B: ``run.alert``, recorded in an offline run too; TensorBoard: text under ``alert/``)."""
        if not self.accelerator.is_main_process:
            return
        log.warning("%s", alert.message)
        with (self.run_dir / "alerts.jsonl").open("a") as f:
            f.write(json.dumps(alert.record()) + "\n")
        if self.cfg.tracker.name == "wandb":
            import wandb

            self.accelerator.get_tracker("wandb", unwrap=True).alert(
                title=f"{alert.rule}: {alert.signal}", text=alert.message, level=wandb.AlertLevel.WARN)
        elif self.cfg.tracker.name == "tensorboard":
            self.accelerator.get_tracker("tensorboard", unwrap=True).add_text(
                f"alert/{alert.rule}", alert.message, global_step=alert.step)

    def finish(self, *, stopped: bool = False) -> None:
        """Close the tracker; a ``stopped`` run (RunStopped) ends as failed in W&B (exit code 1)."""
        if self.cfg.tracker.name == "none":
            return
        if stopped and self.cfg.tracker.name == "wandb" and self.accelerator.is_main_process:
            self.accelerator.get_tracker("wandb", unwrap=True).finish(exit_code=1)
        self.accelerator.end_training()


def log_evaluation(run_dir: str | Path, cfg: Config, *, run_id: str | None, step: int,
                   metrics: Mapping[str, Any], images: Mapping[str, str | Path] | None = None) -> None:
    """Log evaluation results to the training run's tracker, at the trained ``step``.

    ``metrics`` is nested as ``eval/metrics.json``; its numbers are logged as ``eval/cluster/ami``,
    ``eval/baselines/raw_pixels/knn/top1``, ... and each image (a PNG path) under ``eval/<name>``.
    When ``RUN/eval/`` holds the evaluation's arrays (``embeddings.npy``, ``labels.npy``,
    ``clusters.npy``, ``keys.txt``), a seeded sample of :data:`PROJECTOR_ROWS` embeddings goes to
    ``eval/embeddings``: a W&B table (columns ``key``, ``class``, ``cluster``, then one per dimension
    ``d0``, ``d1``, ...: W&B's 2D projection panel) or TensorBoard's projector (metadata key, class,
    cluster). W&B: the run ``run_id`` is re-opened (same directory and mode rules as training), the row
    lands in its history and summary. TensorBoard: scalars and images go to the training run's folder.
    ``metrics.jsonl`` stays the training log. Does nothing off the main process.
    """
    if not dist.is_main_process() or cfg.tracker.name == "none":
        return
    run_dir = Path(run_dir)
    values = numeric_leaves(metrics)
    pictures = {name: Path(path) for name, path in (images or {}).items()}
    for name, path in list(pictures.items()):
        if not path.is_file():
            log.warning("Figure '%s' (%s) does not exist; not logged to the tracker.", name, path)
            del pictures[name]
    if cfg.tracker.name == "wandb" and run_id is None:
        log.warning("The checkpoint stores no W&B run id, so the evaluation is not logged to W&B "
                    "(train with tracker.name=wandb to get one).")
        return
    sample = projector_sample(run_dir / "eval", seed=cfg.run.seed)
    if cfg.tracker.name == "wandb":
        _wandb_evaluation(run_dir, cfg, run_id=run_id, step=step, values=values, images=pictures, sample=sample)
    elif cfg.tracker.name == "tensorboard":
        _tensorboard_evaluation(run_dir, cfg, step=step, values=values, images=pictures, sample=sample)


def projector_sample(folder: Path, *, seed: int, rows: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Up to ``rows`` (default :data:`PROJECTOR_ROWS`) evaluated embeddings, drawn without replacement
    by ``seed`` and kept in file order: ``vectors`` (n, D) float32 and the ``key``, ``class`` (the name
    from ``metrics.json`` when it lists the classes) and ``cluster`` (k-means) of each, as strings;
    None when ``folder`` holds no embeddings. The arrays are memory-mapped: only the sample is read."""
    paths = {name: folder / f"{name}.npy" for name in ("embeddings", "labels", "clusters")}
    if not all(path.is_file() for path in paths.values()) or not (folder / "keys.txt").is_file():
        return None
    feats, labels, clusters = (np.load(path, mmap_mode="r") for path in paths.values())
    n = len(feats)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(rows or PROJECTOR_ROWS, n), replace=False))
    keys = (folder / "keys.txt").read_text().splitlines()
    names: list[str] = []
    if (folder / "metrics.json").is_file():
        names = [str(c) for c in json.loads((folder / "metrics.json").read_text()).get("classes") or []]
    return {"vectors": np.asarray(feats[pick], dtype=np.float32),
            "key": [keys[i] if i < len(keys) else "" for i in pick],
            "class": [names[y] if 0 <= y < len(names) else str(y) for y in labels[pick].tolist()],
            "cluster": [str(c) for c in clusters[pick].tolist()]}


def _wandb_evaluation(run_dir: Path, cfg: Config, *, run_id: str, step: int, values: dict[str, float | int],
                      images: dict[str, Path], sample: Optional[dict[str, Any]]) -> None:
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.tracker.project, id=run_id, resume="allow", dir=str(run_dir), name=cfg.run.name,
                     mode=_wandb_mode(cfg.tracker), reinit="create_new")
    try:
        # eval/* is plotted against eval/step, the trained step, whatever W&B's own step is.
        run.define_metric("eval/step")
        run.define_metric("eval/*", step_metric="eval/step")
        row: dict[str, Any] = {**values, "eval/step": step}
        row.update({f"eval/{name}": wandb.Image(str(path)) for name, path in images.items()})
        if sample is not None:
            dims = [f"d{j}" for j in range(sample["vectors"].shape[1])]
            data = [[key, name, cluster, *vector] for key, name, cluster, vector in
                    zip(sample["key"], sample["class"], sample["cluster"], sample["vectors"].tolist())]
            row["eval/embeddings"] = wandb.Table(columns=["key", "class", "cluster", *dims], data=data)
        # W&B ignores rows below its current step. Offline that is 0, so the row lands at the trained
        # step; online, a resumed run continues after training's last row (step + 1 or later).
        run.log(row, step=max(step, run.step))
    finally:
        run.finish()


def _tensorboard_evaluation(run_dir: Path, cfg: Config, *, step: int, values: dict[str, float | int],
                            images: dict[str, Path], sample: Optional[dict[str, Any]]) -> None:
    import torch
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    # Accelerate's TensorBoard tracker writes to project_dir / project: the same run in TensorBoard.
    writer = SummaryWriter(log_dir=str(run_dir / cfg.tracker.project))
    try:
        for name, value in values.items():
            writer.add_scalar(name, value, global_step=step)
        for name, path in images.items():
            with Image.open(path) as im:
                writer.add_image(f"eval/{name}", np.asarray(im.convert("RGB")), global_step=step, dataformats="HWC")
        if sample is not None:
            metadata = [list(row) for row in zip(sample["key"], sample["class"], sample["cluster"])]
            writer.add_embedding(torch.from_numpy(sample["vectors"]), metadata=metadata, tag="eval/embeddings",
                                 metadata_header=["key", "class", "cluster"], global_step=step)
    finally:
        writer.close()
