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

import torch
from accelerate import Accelerator

from sslkit.atomic import write_json
from sslkit.errors import CheckpointWriteError, MissingInput

STATE_FILE = "trainer_state.json"


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, or raise CheckpointWriteError saying so."""
    probe = Path(folder) / f".write-test-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CheckpointWriteError(f"Run directory '{folder}' is not writable ({err.strerror or err}); set run.dir "
                                   "to a folder you can write, or free space on its disk.") from err


def _agree(accelerator: Accelerator, error: OSError | None) -> OSError | None:
    """Every rank learns whether any rank failed (so none waits forever for a rank that gave up)."""
    failed = torch.tensor([error is not None], dtype=torch.int32, device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    return error or (OSError("another rank could not write its part") if int(failed) else None)


def save_checkpoint(accelerator: Accelerator, *, root: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Save the full training state at ``state['step']``; every rank must call this.

    Written into ``.tmp-step-N`` and renamed when complete. When writing fails on any rank (disk
    full, permission denied), the partial folder is removed, earlier checkpoints are left as they
    are, and every rank raises ``CheckpointWriteError`` naming the folder and the fix."""
    step = int(state["step"])
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    error: OSError | None = None
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            for stale in [*root.glob(".tmp-step-*"), *root.glob(".trash-step-*")]:  # this one, or a killed run's
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
    except OSError as err:
        error = err
    error = _agree(accelerator, error)
    if error is None and accelerator.is_main_process:
        try:
            write_json(tmp / STATE_FILE, state, indent=2, fsync=True)
            if final.exists():  # the same step saved by an earlier run (resumed from an older checkpoint)
                _remove(final)
            os.replace(tmp, final)
            _prune(root, keep=keep)
        except OSError as err:
            error = err
    error = _agree(accelerator, error)
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(root) if root.is_dir() else None
        raise CheckpointWriteError(
            f"Could not write checkpoint step {step} to '{root}' ({error.strerror or error}); free space on that "
            f"disk or make it writable (or set run.dir elsewhere) and resume: "
            f"{f'{kept.name} is intact' if kept else 'no earlier checkpoint exists'}.") from error
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


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, renamed out of ``step-*`` first: a kill midway must never leave a
    folder that still holds trainer_state.json but not all the weights (it would look complete)."""
    trash = folder.with_name(f".trash-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(root: Path, *, keep: int) -> None:
    if keep <= 0:
        return
    for _, folder in complete_checkpoints(root)[:-keep]:
        _remove(folder)


def resolve_resume(resume: str, *, root: Path) -> Path | None:
    """``auto``: newest complete checkpoint (or none); ``false``: none; else a checkpoint folder."""
    if resume in ("false", "False", "no", "none", ""):
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise MissingInput(
            f"run.resume={resume} is not a complete checkpoint folder (no {STATE_FILE}); "
            f"use run.resume=auto or a folder under {root}."
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimizer and RNG states (read with ``weights_only=True``); return the trainer state."""
    accelerator.load_state(str(path))
    return read_state(path)
