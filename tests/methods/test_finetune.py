"""Fine-tuning: weights from a run or a file, the linear probe, the loss, the schedule, two ranks, the command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from two_process import TINY_BACKBONE, compare

from sslkit.cli import main
from sslkit.config import ConfigError, OptimConfig, load_config, recipe_path
from sslkit.data.augment import normalize
from sslkit.data.shardset import resolve_shards
from sslkit.embed import embed_shards
from sslkit.engine import train
from sslkit.evaluate.metrics import classification_metrics
from sslkit.methods import build_method
from sslkit.methods.finetune import finetune_config
from sslkit.optim import build_lr_schedule, build_optimizer
from sslkit.rundir import load_trained
from sslkit.sharding.synthetic import make_synthetic

# As tests/engine/conftest.py: a CCRL model small enough that a few steps take seconds.
TINY = [
    "model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]",
    "method.queue_size=64", "data.batch_size=16", "data.shuffle_buffer=64", "data.workers=1",
    "tracker.name=none", "train.log_every=1", "optim.warmup_steps=2", "train.eval_every=0",
]

# Two-process case: GroupNorm (BatchNorm statistics would depend on the split).
OVERRIDES = [
    "method.name=finetune", "method.num_classes=3", *TINY_BACKBONE, "finetune.label_smoothing=0.1",
]


def global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"input": torch.randn(8, 3, 16, 16, generator=g), "label": torch.randint(0, 3, (8,), generator=g)}
            for _ in range(3)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Synthetic 4-class shards and a 3-step CCRL run on them. No loader workers: imported before the
    sslkit command sets OMP_WAIT_POLICY, torch's spinning threads would starve them (3x slower here)."""
    root = tmp_path_factory.mktemp("finetune")
    make_synthetic(root / "train", num_samples=160, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    make_synthetic(root / "eval", num_samples=96, size=32, seed=1, shard_size=48, prefix="eval", progress=False)
    run = train(load_config(recipe_path("demo"), [*TINY, f"data.shards={root / 'train'}", f"run.dir={root / 'ccrl'}",
                                                  "train.max_steps=3", "data.workers=0"]))
    return root, run


def _overrides(root, *extra: str) -> list[str]:
    return [f"data.shards={root / 'train'}", f"eval.shards={root / 'eval'}", "data.size=32", "data.channels=3",
            "model.in_chans=3", "model.backbone_kwargs.width=4", "method.num_classes=4", "data.workers=0",
            "tracker.name=none", *extra]


def _cfg(root, *extra: str):
    return load_config(recipe_path("supcam-finetune"), _overrides(root, *extra))


def test_backbone_from_a_run_is_the_pretrained_one(pretrained):
    root, run = pretrained
    # The model section comes from the run, whatever the fine-tuning config said.
    cfg, notes = finetune_config(_cfg(root, f"finetune.init={run}", "model.backbone_kwargs.width=8"))
    assert cfg.model.backbone_kwargs == {"width": 4}
    assert any("model.backbone_kwargs" in note for note in notes)
    method = build_method(cfg)
    _, ccrl, _ = load_trained(run)
    ours, theirs = method.backbone.state_dict(), ccrl.backbone.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    torch.manual_seed(0)
    scratch = build_method(_cfg(root, "finetune.init=null"))
    assert not torch.equal(scratch.backbone.stem.weight, theirs["stem.weight"])  # the check is not vacuous


def test_backbone_from_a_safetensors_file(pretrained, tmp_path):
    root, run = pretrained
    _, ccrl, _ = load_trained(run)
    path = tmp_path / "backbone.safetensors"
    save_file(ccrl.backbone.state_dict(), str(path))
    method = build_method(_cfg(root, f"finetune.init={path}"))
    for name, value in ccrl.backbone.state_dict().items():
        assert torch.equal(method.backbone.state_dict()[name], value), name
    # A different network: one sentence that names the fix.
    with pytest.raises(ConfigError, match="do not fit model.backbone=preact_resnet18") as err:
        build_method(_cfg(root, f"finetune.init={path}", "model.backbone_kwargs.width=8"))
    assert "\n" not in str(err.value) and "model.backbone_kwargs" in str(err.value)


def test_frozen_backbone_stays_put_while_the_head_learns(pretrained):
    root, _ = pretrained
    method = build_method(_cfg(root, "finetune.init=null", "finetune.freeze_backbone=true"))
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.0), model=method)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 32 * 4 + 4  # the head only
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.train()
    assert not method.backbone.training  # BatchNorm statistics are not updated either
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = method({"input": torch.randn(8, 3, 32, 32, generator=g), "label": torch.randint(0, 4, (8,), generator=g)})
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = method.state_dict()
    for name, value in before.items():
        if name.startswith("backbone."):
            assert torch.equal(after[name], value), name  # running means included
    assert not torch.equal(after["head.weight"], before["head.weight"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_label_smoothed_cross_entropy(pretrained, smoothing):
    root, _ = pretrained
    torch.manual_seed(0)
    method = build_method(_cfg(root, "finetune.init=null", f"finetune.label_smoothing={smoothing}")).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3, 1, 2])
    out = method({"input": x, "label": y})
    with torch.no_grad():
        logp = F.log_softmax(method.head(method.backbone(x)), dim=1)  # (6, 4)
    # Szegedy et al.: target (1 - e) one-hot + e / K uniform.
    hand = ((1 - smoothing) * -logp[torch.arange(6), y] + smoothing * -logp.mean(1)).mean()
    assert torch.allclose(out.loss, hand, atol=1e-6)
    assert float(out.logs["acc"]) == pytest.approx(float((logp.argmax(1) == y).float().mean()))
    np.testing.assert_allclose(method.predict(x).sum(1).numpy(), 1.0, rtol=1e-6)
    assert method.embed(x).shape == (6, 32) and method.embed(x, features="projector").shape == (6, 4)


def test_recipes_and_the_step_schedule():
    sup = load_config(recipe_path("supcam-finetune"))
    assert (sup.optim.name, sup.optim.lr, sup.optim.momentum) == ("sgd", 0.01, 0.9)
    assert (sup.data.batch_size, sup.train.epochs) == (16, 15)
    assert (sup.finetune.label_smoothing, sup.finetune.views, sup.method.name) == (0.1, "rotate", "finetune")
    per = 522 // 16  # the chromosome-clusters training split: 32 steps per epoch
    lrs = build_lr_schedule(sup.optim, total_steps=sup.train.epochs * per, steps_per_epoch=per)
    assert len(lrs) == 480
    assert lrs[0] == pytest.approx(0.01) and lrs[8 * per - 1] == pytest.approx(0.01)  # epochs 0-7
    assert lrs[8 * per] == pytest.approx(0.001) and lrs[12 * per - 1] == pytest.approx(0.001)  # epochs 8-11
    assert lrs[12 * per] == pytest.approx(0.0001) and lrs[-1] == pytest.approx(0.0001)  # epochs 12-14
    sscl = load_config(recipe_path("sscl-finetune"))
    assert (sscl.optim.name, sscl.optim.lr, sscl.data.batch_size, sscl.train.epochs) == ("adam", 1e-4, 64, 100)
    assert sscl.finetune.label_smoothing == 0.0 and sscl.optim.schedule == "constant"


def test_prepare_rotation_only_and_labels(pretrained):
    root, _ = pretrained
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    label = torch.tensor([0, 1, 2, 3])
    plain = normalize(images.float() / 255)
    for mode, extra in (("none", []), ("rotate", ["data.views.rotation=0"])):
        method = build_method(_cfg(root, "finetune.init=null", f"finetune.views={mode}", *extra))
        batch = method.prepare({"image": images, "label": label, "id": ["a"] * 4}, g)
        assert set(batch) == {"input", "label"} and torch.equal(batch["label"], label)
        assert torch.allclose(batch["input"], plain, atol=1e-5), mode  # no crop, flip, jitter or blur
    # Rotation alone keeps a flat image flat; the pretraining views (jitter, p = 0.8) do not.
    flat = torch.full((8, 3, 32, 32), 100, dtype=torch.uint8)
    rotate = build_method(_cfg(root, "finetune.init=null", "finetune.views=rotate"))
    rotated = rotate.prepare({"image": flat, "label": label.repeat(2)}, g)["input"]
    assert torch.allclose(rotated, normalize(flat.float() / 255), atol=1e-5)
    views = build_method(_cfg(root, "finetune.init=null", "finetune.views=views", "data.views.p_jitter=1.0"))
    assert not torch.allclose(views.prepare({"image": flat, "label": label.repeat(2)}, g)["input"], rotated, atol=1e-3)
    with pytest.raises(ConfigError, match="training shards at .* hold labels outside 0..3"):
        rotate.prepare({"image": images, "label": torch.tensor([0, -1, 2, 3])}, g)


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    ranks = compare(__file__, tmp_path)
    assert "head.weight" in ranks[0]["grads0"] and "backbone.stem.weight" in ranks[0]["grads0"]


def test_finetune_command_end_to_end(pretrained, tmp_path, capsys):
    root, run = pretrained
    out, init = tmp_path / "ft", tmp_path / "pretrained"
    shutil.copytree(run, init)
    # lr 0.05 for 16 epochs: the 32-d features of a width-4 network learn slowly at the paper's 0.01.
    # 8 epochs at lr 0.1 were too few: over run.seed 0-3 the accuracy ranged 0.31-0.56, and which seed
    # failed moved with the CPU's kernels. These settings gave 0.58-0.84 over run.seed 0-7.
    main(["finetune", "supcam-finetune", *_overrides(root, f"finetune.init={init}", f"run.dir={out}",
                                                    "train.epochs=16", "optim.lr=0.05", "optim.milestones=[12]")])
    printed = capsys.readouterr().out
    assert "confusion matrix" in printed and "inflammatory" in printed
    results = json.loads((out / "eval" / "classification.json").read_text())
    assert results["num_samples"] == 96 and results["step"] == 16 * (160 // 16)
    # Chance is 0.25 on the four balanced classes: guessing reaches 0.4 (38 of 96) with
    # probability below 0.1 % (binomial, mean 24, sd 4.2).
    assert results["probe"]["accuracy"] > 0.4
    saved = np.load(out / "eval" / "predictions.npz")
    pred = saved["probabilities"].argmax(1)
    again = classification_metrics(saved["labels"], pred, scores=saved["probabilities"], num_classes=4)
    for key, value in again.items():
        assert results["probe"][key] == pytest.approx(value, abs=1e-6), key
    cm = np.zeros((4, 4), dtype=int)
    np.add.at(cm, (saved["labels"], pred), 1)
    assert results["confusion_matrix"] == cm.tolist()
    assert json.loads((out / "eval" / "metrics.json").read_text())["classifier"] == results["probe"]
    # The fine-tuned run reloads as it was trained, even without its init: its predictions are the saved ones.
    shutil.rmtree(init)
    _, method, _ = load_trained(out)
    probs, labels, keys = embed_shards(method.predict, resolve_shards(str(root / "eval")), size=32, channels=3,
                                       batch_size=64, workers=0)
    np.testing.assert_allclose(probs, saved["probabilities"], rtol=1e-5, atol=1e-6)
    assert keys == saved["keys"].tolist() and labels.tolist() == saved["labels"].tolist()


@pytest.mark.parametrize("extra, named", [
    (["finetune.init=no/such/run"], "finetune.init"),
    (["method.name=ccrl"], "method.name"),
    (["eval.shards=null"], "eval.shards"),
])
def test_bad_input_ends_in_one_sentence(pretrained, tmp_path, capsys, extra, named):
    root, _ = pretrained
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "supcam-finetune", *_overrides(root, f"run.dir={tmp_path / 'x'}", *extra)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sslkit: error:") and named in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()  # refused before any training
