"""A run directory, and how every command after training reads it.

``sslkit pretrain`` and ``sslkit finetune`` write::

    runs/NAME/
      config.yaml                 the resolved config, for people (the checkpoint holds the one read back)
      metrics.jsonl               the training log, one JSON object per logged step
      alerts.jsonl                the train.alert rules that fired, one JSON object each (only if any did)
      init.json                   where model.init's weights came from and which keys loaded (only with one)
      checkpoints/step-NNNNNNN/   model.safetensors, trainer_state.json (config, step, run id, git SHA)
                                  and Accelerate's optimizer and RNG state
      eval/                       what ``sslkit evaluate`` writes (metrics.json, arrays, figures)
      report.html                 what ``sslkit report`` writes

Evaluation, fine-tuning from a run, ``sslkit embed``, export and the demo read runs through
this module only. Run directories of earlier sslkit versions load the same way: the config
is rebuilt from the checkpoint's trainer state, keys since retired are dropped
(``sslkit.config.RETIRED``) and keys added since take their defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

from safetensors.torch import load_file

from sslkit.checkpoint import latest_checkpoint, read_state, resolve_resume
from sslkit.config import Config, ConfigError, from_dict
from sslkit.errors import MissingInput
from sslkit.methods import Method, build_method


class TrainedRun(NamedTuple):
    cfg: Config
    method: Method  # in eval mode, on the CPU
    state: dict[str, Any]  # the trainer state, with "checkpoint": the folder it came from


def checkpoint_of(run_dir: str | Path, *, checkpoint: str = "auto") -> Path:
    """The newest complete checkpoint of ``run_dir`` (``auto``), or the checkpoint folder given."""
    root = Path(run_dir) / "checkpoints"
    path = resolve_resume(checkpoint, root=root) if checkpoint != "auto" else latest_checkpoint(root)
    if path is None:
        raise MissingInput(f"No complete checkpoint under {root}; train first with `sslkit pretrain CONFIG`.")
    return path


def stored_config(run_dir: str | Path, *, checkpoint: str = "auto") -> Config:
    """The config a run trained with, from its checkpoint (nothing is built)."""
    return from_dict(read_state(checkpoint_of(run_dir, checkpoint=checkpoint))["config"])


def load_trained(run_dir: str | Path, *, checkpoint: str = "auto") -> TrainedRun:
    """The config, the method with its trained weights, and the trainer state of a checkpoint."""
    path = checkpoint_of(run_dir, checkpoint=checkpoint)
    state = read_state(path)
    cfg = from_dict(state["config"])
    method = build_method(cfg, init=False)  # the checkpoint holds every weight: model.init need not be there
    method.load_state_dict(load_file(str(path / "model.safetensors")))
    return TrainedRun(cfg, method.eval(), {**state, "checkpoint": str(path)})


def eval_shards(cfg: Config, *, shards: Optional[str] = None, split: Optional[str] = None) -> str:
    """Which shards to evaluate: ``shards`` (else eval.shards, else data.shards), and with ``split``
    that split of it: the sub-folder ``split`` of a folder written by ``sslkit shard ... --split``,
    or the sibling folder of that name (``shards/gband/test`` with ``--split val``: ``shards/gband/val``)."""
    base = shards or cfg.eval.shards or cfg.data.shards
    if not split:
        return base
    for candidate in (Path(base) / split, Path(base).parent / split):
        if (candidate / "manifest.json").is_file():
            return str(candidate)
    raise ConfigError(f"No split '{split}' at '{Path(base) / split}' or '{Path(base).parent / split}' (no "
                      "manifest.json); pass --shards pointing at the shard folder that holds the splits.")


__all__ = ["TrainedRun", "checkpoint_of", "eval_shards", "load_trained", "stored_config"]
