"""Checkpoints: Accelerate's ``save_state`` written to a temporary folder, renamed when complete.

    runs/<name>/checkpoints/step-00000500/   model.safetensors (queue and momentum encoder
                                             inside), optimizer.bin, random_states_<rank>.pkl,
                                             trainer_state.json (step, tracker run id, config, git SHA)

A folder without ``trainer_state.json`` is incomplete and never resumed from. The step
is read from ``trainer_state.json``, never from the folder name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, *, root: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Save the full training state at ``state['step']``; every rank must call this."""
    step = int(state["step"])
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():  # the same step saved by an earlier, interrupted run
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep=keep)
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    found = []
    for folder in Path(root).glob("step-*"):
        if (folder / STATE_FILE).is_file():
            try:
                found.append((int(read_state(folder)["step"]), folder))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue  # a damaged state file: not a checkpoint we can resume from
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _prune(root: Path, *, keep: int) -> None:
    if keep <= 0:
        return
    for _, folder in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def resolve_resume(resume: str, *, root: Path) -> Path | None:
    """``auto``: newest complete checkpoint (or none); ``false``: none; else a checkpoint folder."""
    if resume in ("false", "False", "no", "none", ""):
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"run.resume={resume} is not a complete checkpoint folder (no {STATE_FILE}); "
            f"use run.resume=auto or a folder under {root}."
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states (read with ``weights_only=True``); return the trainer state."""
    accelerator.load_state(str(path))
    return read_state(path)
