"""Train k steps, save, resume, train k more == 2k steps straight."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from sslkit.checkpoint import complete_checkpoints, latest_checkpoint
from sslkit.config import load_config, recipe_path
from sslkit.engine import train

from .conftest import TINY


def _cfg(shards, run_dir, *extra):
    return load_config(recipe_path("demo"), [*TINY, f"data.shards={shards / 'train'}",
                                             f"run.dir={run_dir}", "train.max_steps=8", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensor", "pil"])
def test_resume_equals_straight_run(tiny_shards, tmp_path, backend):
    # 160 samples / batch 16 = 10 batches per epoch: k = 4 resumes in the middle of epoch 0,
    # so the resumed run must rebuild the epoch's stream and skip exactly the consumed batches
    # (and, with the tensor back-end, re-seed the views of each micro-batch the same way).
    # the PIL back-end makes no HED stain jitter (the demo recipe's is turned off with it)
    views = f"data.views.backend={backend}", *(["data.views.hed=0"] if backend == "pil" else [])
    run = train(_cfg(tiny_shards, tmp_path / "run", "train.ckpt_every=4", "train.keep_ckpts=5", *views))
    root = run / "checkpoints"
    assert [s for s, _ in complete_checkpoints(root)] == [4, 8]
    straight = load_file(str(root / "step-00000008" / "model.safetensors"))
    # Kill -9 after step 4: the step-8 checkpoint never existed. Resume and train k more.
    shutil.rmtree(root / "step-00000008")
    train(_cfg(tiny_shards, run, "train.ckpt_every=4", "train.keep_ckpts=5", "run.resume=auto", *views))
    resumed = load_file(str(root / "step-00000008" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    # Same seed, same data order, CPU: agreement to float32 round-off, queue included.
    for name in straight:
        assert torch.allclose(straight[name].float(), resumed[name].float(), rtol=1e-5, atol=1e-6), name
    assert int(resumed["queue.ptr"]) == (8 * 16) % 64 and int(resumed["queue.filled"]) == 64
    # Training did move the weights between the two checkpoints (the comparison is not vacuous).
    at4 = load_file(str(root / "step-00000004" / "model.safetensors"))
    assert not torch.allclose(at4["encoder.backbone.stem.weight"], resumed["encoder.backbone.stem.weight"])


def test_incomplete_checkpoint_is_ignored(tiny_shards, tmp_path):
    run = train(_cfg(tiny_shards, tmp_path / "run", "train.max_steps=2", "train.ckpt_every=1"))
    root = run / "checkpoints"
    assert [s for s, _ in complete_checkpoints(root)] == [1, 2]
    # A checkpoint killed mid-write has no trainer_state.json: never resumed from.
    broken = root / "step-00000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    (root / ".tmp-step-00000010").mkdir()
    assert latest_checkpoint(root).name == "step-00000002"
    # Resuming with max_steps already reached trains nothing and keeps the checkpoint.
    before = (root / "step-00000002" / "model.safetensors").read_bytes()
    train(_cfg(tiny_shards, tmp_path / "run", "train.max_steps=2"))
    assert (root / "step-00000002" / "model.safetensors").read_bytes() == before
