"""Side effects of the main process: metrics.jsonl always, plus an Accelerate tracker.

Weights & Biases runs offline unless ``tracker.mode=online`` and an API key is set;
``tracker.name=none`` turns trackers off (``metrics.jsonl`` is still written).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from sslkit.config import Config, TrackerConfig, to_dict

log = logging.getLogger(__name__)


def tracker_backend(cfg: TrackerConfig) -> str | None:
    """The ``log_with`` argument for ``Accelerator``."""
    return None if cfg.name == "none" else cfg.name


def _wandb_mode(cfg: TrackerConfig) -> str:
    if cfg.mode == "online" and not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
        log.warning("tracker.mode=online but no WANDB_API_KEY is set: logging to W&B offline instead.")
        return "offline"
    return cfg.mode


class RunLogger:
    """Writes ``metrics.jsonl`` in the run directory and forwards to the Accelerate tracker."""

    def __init__(self, accelerator: Accelerator, cfg: Config, *, run_dir: Path, run_id: str | None = None) -> None:
        self.accelerator, self.cfg, self.run_dir = accelerator, cfg, run_dir
        self.run_id = run_id
        self.path = run_dir / "metrics.jsonl"

    def start(self) -> None:
        if self.cfg.tracker.name == "none":
            return
        init_kwargs: dict[str, Any] = {}
        if self.cfg.tracker.name == "wandb":
            os.environ.setdefault("WANDB_SILENT", "true")
            # Resuming passes the stored id, so W&B continues the same run.
            init_kwargs["wandb"] = {"dir": str(self.run_dir), "id": self.run_id, "resume": "allow",
                                    "name": self.cfg.run.name, "mode": _wandb_mode(self.cfg.tracker)}
        self.accelerator.init_trackers(self.cfg.tracker.project, config=to_dict(self.cfg), init_kwargs=init_kwargs)
        if self.cfg.tracker.name == "wandb" and self.accelerator.is_main_process:
            self.run_id = self.accelerator.get_tracker("wandb", unwrap=True).id

    def log(self, values: dict[str, Any], *, step: int) -> None:
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.cfg.tracker.name != "none":
            self.accelerator.log(clean, step=step)

    def finish(self) -> None:
        if self.cfg.tracker.name != "none":
            self.accelerator.end_training()
