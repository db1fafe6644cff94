"""Training survives bad data and non-finite steps up to stated limits, and stops with one sentence past them."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sslkit.checkpoint import CheckpointWriteError, complete_checkpoints, latest_checkpoint
from sslkit.config import load_config, recipe_path
from sslkit.engine import RunStopped, train
from sslkit.methods.ccrl import CCRL

from .conftest import TINY


def _cfg(shards, run_dir, *extra):
    return load_config(recipe_path("demo"), [*TINY, f"data.shards={shards}", f"run.dir={run_dir}", "data.workers=0",
                                             *extra])


def _png(array) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _damage(src, dst, *, every: int):
    """Copy a shard set, replacing the image of every ``every``-th sample by a fault, in turn: bytes that do not
    decode, a grayscale crop in the RGB set, a crop of another size than the manifest's 32x32."""
    shutil.copytree(src, dst)
    faults = [b"not a png at all", _png(np.zeros((32, 32), np.uint8)), _png(np.zeros((40, 32, 3), np.uint8))]
    damaged = 0
    for shard in sorted(dst.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                if member.name.endswith(".png") and int(member.name.split("-")[-1].split(".")[0]) % every == 0:
                    data, damaged = faults[damaged % 3], damaged + 1
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return damaged


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bad_samples_are_skipped_counted_and_logged(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    assert _damage(tiny_shards / "train", shards, every=10) >= 15  # about 10 % of 160 crops, all three kinds
    run = train(_cfg(shards, tmp_path / "run", "train.max_steps=12", "data.max_bad_fraction=0.5"))
    last = [r for r in _rows(run) if "corrupt_samples" in r][-1]
    # 12 batches of 16 good crops: about a tenth of the crops read were faults, each counted once.
    assert 10 <= last["corrupt_samples"] <= 40 and 0.05 < last["bad_fraction"] < 0.2
    assert latest_checkpoint(run / "checkpoints").name == "step-00000012"
    # A resumed run continues the counts (kept in the checkpoint) instead of starting from zero.
    train(_cfg(shards, run, "train.max_steps=16", "data.max_bad_fraction=0.5"))
    resumed = [r for r in _rows(run) if "corrupt_samples" in r][-1]
    assert resumed["step"] == 16 and resumed["corrupt_samples"] > last["corrupt_samples"]


def test_too_much_bad_data_stops_the_run_with_the_fix(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    _damage(tiny_shards / "train", shards, every=3)  # a third of the crops
    with pytest.raises(RunStopped, match=r"above data.max_bad_fraction=0.05.*sslkit shard verify"):
        train(_cfg(shards, tmp_path / "run", "train.max_steps=30"))


def _nan_after(monkeypatch, calls: set[int]):
    """CCRL's loss becomes NaN on the given forward calls (1-based), as a diverging step would."""
    real, count = CCRL.forward, [0]

    def forward(self, batch):
        count[0] += 1
        out = real(self, batch)
        return out._replace(loss=out.loss * float("nan")) if count[0] in calls else out

    monkeypatch.setattr(CCRL, "forward", forward)


def test_a_non_finite_step_is_skipped_and_logged(tiny_shards, tmp_path, monkeypatch):
    _nan_after(monkeypatch, {3})
    run = train(_cfg(tiny_shards / "train", tmp_path / "run", "train.max_steps=5", "method.queue_size=256"))
    assert [r for r in _rows(run) if "skipped_steps" in r] == [{"step": 3, "skipped_steps": 1}]
    weights = load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))
    assert int(weights["queue.filled"]) == 4 * 16  # the skipped step's keys never entered the queue
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


def test_repeated_non_finite_steps_stop_the_run_naming_them(tiny_shards, tmp_path, monkeypatch):
    _nan_after(monkeypatch, set(range(3, 100)))
    run = tmp_path / "run"
    with pytest.raises(RunStopped, match=r"Steps 3 to 5 all gave a non-finite loss.*max_bad_steps=3.*optim.lr"):
        train(_cfg(tiny_shards / "train", run, "train.max_steps=20", "train.max_bad_steps=3", "train.ckpt_every=2"))
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [2, 4]  # step 4 was saved, NaN-free
    weights = load_file(str(run / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


@pytest.mark.parametrize("errno,reason", [(28, "No space left on device"), (13, "Permission denied")])
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tiny_shards, tmp_path, monkeypatch, errno, reason):
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, [0]

    def save_state(self, output_dir=None, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint: write part of it, then the disk is full (or access is denied)
            real(self, output_dir, **kwargs)
            raise OSError(errno, reason)
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match=rf"step 4 .*{reason}.*step-00000002 is intact"):
        train(_cfg(tiny_shards / "train", run, "train.max_steps=6", "train.ckpt_every=2"))
    root = run / "checkpoints"
    assert [s for s, _ in complete_checkpoints(root)] == [2]
    assert not list(root.glob(".tmp-*"))  # the partial folder is gone
    # Resuming continues from the intact checkpoint.
    monkeypatch.setattr(Accelerator, "save_state", real)
    train(_cfg(tiny_shards / "train", run, "train.max_steps=6", "train.ckpt_every=2"))
    assert [s for s, _ in complete_checkpoints(root)][-1] == 6


def test_an_unwritable_run_directory_is_named_before_training(tiny_shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory should go")  # refused even to root, unlike chmod
    with pytest.raises(CheckpointWriteError, match=r"Run directory '.*file/run' is not writable.*set run.dir"):
        train(_cfg(tiny_shards / "train", blocker / "run", "train.max_steps=2"))


def test_missing_shards_count_as_bad_data(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards / "train", shards)
    gone = sorted(shards.glob("*.tar"))[-1]  # the last shard: 16 of 160 samples
    gone.unlink()
    with pytest.raises(RunStopped, match=rf"1 shards .* are missing \({gone}.*16 samples.*data.max_bad_fraction"):
        train(_cfg(shards, tmp_path / "stopped", "train.max_steps=2"))
    run = train(_cfg(shards, tmp_path / "run", "train.max_steps=2", "data.max_bad_fraction=0.2"))
    last = [r for r in _rows(run) if "corrupt_samples" in r][-1]
    assert last["corrupt_samples"] == 16  # the missing shard's samples, from its manifest entry


class _Recorder:
    """The method's side of a step: what the engine asked of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def after_optimizer_step(self, step: int) -> None:
        self.calls.append("after_optimizer_step")

    def skip_step(self) -> None:
        self.calls.append("skip_step")


def _fp16_step(model, optimizer, scaler, *, loss_factor: float) -> None:
    """Scaled backward and gradient clipping (which unscales), as the engine's fp16 step does before judging it."""
    loss = model(torch.ones(4, 3)).sum() * loss_factor
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer.optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


@pytest.fixture
def fp16_optimizer():
    """A linear model's SGD in accelerate's own optimizer wrapper with a real loss scaler (on CPU here)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    Accelerator(cpu=True)  # the optimizer wrapper reads accelerate's state
    model = torch.nn.Linear(3, 1)
    yield model, AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), device_placement=False,
                                      scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    AcceleratorState._reset_state(reset_partial_state=False)


def test_skipped_fp16_steps_leave_the_loss_scaler_ready_for_the_next_step(fp16_optimizer):
    """fp16 (GPU) through accelerate's own optimizer wrapper with a real loss scaler (on CPU here): a step the
    engine skips changes no weight, backs the scale off, and the next step still works; a step the scaler skips
    for inf gradients makes the method drop its keys instead of a momentum step."""
    from sslkit.engine import apply_step

    model, optimizer = fp16_optimizer
    scaler, method, before = optimizer.scaler, _Recorder(), model.weight.detach().clone()

    _fp16_step(model, optimizer, scaler, loss_factor=float("nan"))  # the engine sees a NaN loss: skipped
    assert not apply_step(optimizer, method, step=0, ok=False)
    optimizer.zero_grad()
    assert torch.equal(model.weight, before) and scaler.get_scale() == 512.0 and method.calls == ["skip_step"]

    _fp16_step(model, optimizer, scaler, loss_factor=1.0)  # unscale_ again: it would raise had update() not run
    assert apply_step(optimizer, method, step=1, ok=True)
    optimizer.zero_grad()
    assert not torch.equal(model.weight, before) and method.calls[-1] == "after_optimizer_step"

    updated = model.weight.detach().clone()
    scaler.scale(model(torch.ones(4, 3)).sum() * 1e38).backward()  # finite loss, gradients overflow once scaled
    assert not apply_step(optimizer, method, step=2, ok=True)  # the scaler skipped it
    assert torch.equal(model.weight, updated) and method.calls[-1] == "skip_step" and scaler.get_scale() == 256.0


def test_a_skipped_fp16_step_without_the_back_off_breaks_the_next_step(fp16_optimizer):
    """The negative control of the test above: skipping the update alone leaves the scaler mid-step."""
    model, optimizer = fp16_optimizer
    _fp16_step(model, optimizer, optimizer.scaler, loss_factor=float("nan"))
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="unscale_"):
        _fp16_step(model, optimizer, optimizer.scaler, loss_factor=1.0)
