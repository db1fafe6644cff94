"""sslkit export: the file rebuilt by timm.create_model gives the run's embeddings; metadata; errors;
no half-written files; fine-tuning from an exported file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

import sslkit.export as export
from sslkit.config import ConfigError, load_config, recipe_path
from sslkit.data.augment import build_eval_transform, normalize
from sslkit.engine import train
from sslkit.export import describe, export_run, load_backbone, read_info
from sslkit.methods import build_method
from sslkit.methods.finetune import finetune_config
from sslkit.rundir import load_trained
from sslkit.sharding.synthetic import make_synthetic

# As tests/engine/conftest.py: a few steps take seconds. No loader workers (see test_finetune.py).
COMMON = ["data.batch_size=16", "data.shuffle_buffer=64", "data.workers=0", "tracker.name=none",
          "train.max_steps=3", "train.log_every=1", "optim.warmup_steps=1", "train.eval_every=0"]
CCRL = ["model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]", "method.queue_size=64"]
AE = {  # tiny widths; BatchNorm on, so running statistics must travel too
    "fc": (["model.backbone_kwargs.hidden=[32,16]", "method.latent=6"], {"latent": 6, "hidden": [32, 16]}),
    "conv": (["model.backbone_kwargs.widths=[4,8,8,8,6]"], {"widths": [4, 8, 8, 8, 6]}),
    "conv_pool": (["model.backbone_kwargs.widths=[4,8,8,8,6]"], {"widths": [4, 8, 8, 8, 6]}),
    "resnet": (["model.backbone_kwargs.channels=[8,8,8,8]"], {"channels": [8, 8, 8, 8]}),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    make_synthetic(root / "train", num_samples=160, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    make_synthetic(root / "eval", num_samples=96, size=32, seed=1, shard_size=48, prefix="eval", progress=False)
    return root


def _train(root: Path, name: str, *overrides: str, recipe: str | None = None) -> Path:
    cfg = load_config(recipe_path(recipe) if recipe else None,
                      [*COMMON, f"data.shards={root / 'train'}", f"run.dir={root / name}", *overrides])
    return train(cfg)


@pytest.fixture(scope="module")
def ccrl_run(root) -> Path:
    # The demo recipe's momentum 0.9: after 3 steps the two encoders differ.
    return _train(root, "ccrl", *CCRL, recipe="demo")


def _images(channels: int, size: int, n: int = 6) -> torch.Tensor:
    """uint8 images as the loader yields them, scaled to [0, 1]."""
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8).float() / 255.0


def _exact_timm_call(path: Path, info: dict, **extra):
    """The documented call, with the architecture and kwargs the test expects (not read back)."""
    return timm.create_model(info["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             in_chans=info["in_chans"], **info["backbone_kwargs"], **extra).eval()


def _check_same_embeddings(run: Path, path: Path, encoder: str, *, mean: float, std: float) -> torch.Tensor:
    """timm's rebuild, fed images normalised with the file's mean/std, equals method.embed on
    the same images normalised as sslkit's loader does."""
    info = read_info(path)
    c, h, w = info["input_size"]
    assert info["mean"] == [mean] * c and info["std"] == [std] * c
    _, method, _ = load_trained(run)
    unit = _images(c, h)
    with torch.no_grad():
        theirs = method.embed(normalize(unit), encoder=encoder, features="backbone")
        ours = _exact_timm_call(path, info, num_classes=0)((unit - mean) / std)
        loaded, _ = load_backbone(path)
        again = loaded((unit - mean) / std)
    assert ours.shape == (len(unit), info["num_features"])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(ours, again)
    return ours


@pytest.mark.parametrize("encoder", ["momentum", "query"])
def test_ccrl_preact_resnet18_both_encoders(ccrl_run, tmp_path, encoder):
    path = tmp_path / f"{encoder}.safetensors"
    summary = export_run(ccrl_run, path, encoder=encoder)
    assert summary["encoder"] == encoder and summary["step"] == 3 and summary["max_abs_diff"] == 0.0
    assert summary["architecture"] == "preact_resnet18" and summary["backbone_kwargs"] == {"width": 4}
    assert summary["in_chans"] == 3
    assert summary["input_size"] == [3, 32, 32] and summary["num_features"] == 32
    ours = _check_same_embeddings(ccrl_run, path, encoder, mean=0.5, std=0.5)
    _, method, state = load_trained(ccrl_run)
    source = method.key_encoder.ema.backbone if encoder == "momentum" else method.encoder.backbone
    tensors = load_file(str(path))
    assert tensors.keys() == source.state_dict().keys() and len(tensors) == summary["num_tensors"]
    assert all(torch.equal(tensors[k], v) for k, v in source.state_dict().items())
    info = read_info(path)
    assert info["git"] == state["git"] and info["method"] == "ccrl" and info["step"] == 3
    assert info["sslkit_format"] == export.FORMAT
    # Exact bits: for mean = std = 0.5 both sides compute the same (x - 0.5) / 0.5.
    with torch.no_grad():
        assert torch.equal(ours, method.embed(normalize(_images(3, 32)), encoder=encoder))
    # The other encoder gives other features, so the comparison above is not vacuous.
    other = "query" if encoder == "momentum" else "momentum"
    with torch.no_grad():
        assert not torch.allclose(ours, method.embed(normalize(_images(3, 32)), encoder=other), atol=1e-3)
    line = describe(summary)
    assert "\n" not in line and f"{encoder} encoder of the ccrl run at step 3" in line
    assert "timm.create_model('preact_resnet18', pretrained=True" in line and "width=4" in line


def test_default_encoder_is_the_evaluated_one_and_timm_reads_the_normalisation(ccrl_run, tmp_path):
    summary = export_run(ccrl_run, tmp_path / "b.safetensors")
    assert summary["encoder"] == "momentum"  # eval.encoder's default
    model, info = load_backbone(tmp_path / "b.safetensors")
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 32, 32) and data["mean"] == (0.5,) * 3 and data["std"] == (0.5,) * 3
    assert data["crop_pct"] == 1.0 and data["interpolation"] == "bilinear"  # sslkit resizes the whole crop
    # So timm's own transform is sslkit's evaluation transform, on an image of another size and shape.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    torch.testing.assert_close(create_transform(**data)(image), build_eval_transform(size=32, channels=3)(image),
                               rtol=0, atol=1e-6)


def test_what_timm_does_with_the_missing_classifier(ccrl_run, tmp_path):
    """num_classes=0 or K != 1000 load the backbone (a new head for K); the default 1000 loads
    strictly and fails on the classifier the file does not hold, unless the overlay says 0."""
    path = tmp_path / "q.safetensors"
    export_run(ccrl_run, path, encoder="query")
    info = read_info(path)
    x = normalize(_images(3, 32))
    with torch.no_grad():
        ref = _exact_timm_call(path, info, num_classes=0)(x)
        head = _exact_timm_call(path, info, num_classes=5)
        assert head(x).shape == (6, 5)
        assert torch.equal(head.forward_head(head.forward_features(x), pre_logits=True), ref)
        with pytest.raises(RuntimeError, match="fc.weight"):
            _exact_timm_call(path, info)
        full = timm.create_model("preact_resnet18", pretrained=True, width=4,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=0)).eval()
        assert isinstance(full.fc, torch.nn.Identity) and torch.equal(full(x), ref)


def test_timm_backbone_with_one_channel(root, tmp_path):
    run = _train(root, "resnet10t", "method.name=simclr", "model.backbone=resnet10t", "model.in_chans=1",
                 "data.channels=1", "model.backbone_kwargs.channels=[8,8,16,16]", "model.projector=[16,8]")
    path = tmp_path / "resnet10t.safetensors"
    summary = export_run(run, path)
    assert summary["encoder"] == "query" and summary["in_chans"] == 1 and summary["num_features"] == 16
    assert summary["backbone_kwargs"] == {"channels": [8, 8, 16, 16]} and summary["input_size"] == [1, 32, 32]
    _check_same_embeddings(run, path, "query", mean=0.5, std=0.5)
    with pytest.raises(ConfigError, match="one encoder"):
        export_run(run, tmp_path / "m.safetensors", encoder="momentum")


@pytest.mark.parametrize("arch", list(AE))
def test_autoencoder_encoders(root, tmp_path, arch):
    overrides, kwargs = AE[arch]
    run = _train(root, f"ae-{arch}", "method.name=autoencoder", f"method.arch={arch}", "data.size=16", *overrides)
    path = tmp_path / f"{arch}.safetensors"
    summary = export_run(run, path)
    name = "resnet18" if arch == "resnet" else f"dcae_{arch}_encoder"
    expected = kwargs if arch == "resnet" else {"img_size": 16, **kwargs, "norm": True}
    assert (summary["architecture"], summary["backbone_kwargs"]) == (name, expected)
    assert summary["input_size"] == [3, 16, 16]
    # The encoders take [0, 1] images: mean 0, std 1.
    _check_same_embeddings(run, path, "query", mean=0.0, std=1.0)
    data = resolve_data_config({}, model=load_backbone(path)[0])
    assert data["input_size"] == (3, 16, 16) and data["mean"] == (0.0,) * 3 and data["std"] == (1.0,) * 3


def test_scl_with_a_vision_transformer(root, tmp_path):
    run = _train(root, "scl-vit", "method.name=scl", "model.backbone=vit_tiny_patch16_224",
                 "model.backbone_kwargs.img_size=32", "model.backbone_kwargs.patch_size=8",
                 "model.backbone_kwargs.depth=1", "model.embed_dim=8", "data.balanced.classes=4",
                 "data.balanced.per_class=2", "data.batch_size=8", "data.views.recipe=global_global")
    path = tmp_path / "vit.safetensors"
    summary = export_run(run, path)
    assert summary["architecture"] == "vit_tiny_patch16_224" and summary["num_features"] == 192
    _check_same_embeddings(run, path, "query", mean=0.5, std=0.5)


def _finetune_cfg(root: Path, *extra: str):
    cfg, _ = finetune_config(load_config(recipe_path("supcam-finetune"), [
        f"data.shards={root / 'train'}", f"eval.shards={root / 'eval'}", "data.size=32", "data.channels=3",
        "model.in_chans=3", "model.backbone_kwargs.width=4", "method.num_classes=4", *COMMON,
        "train.epochs=0", "optim.schedule=constant", *extra]))
    return cfg


def test_finetune_from_an_exported_file_and_export_of_the_finetuned_run(root, ccrl_run, tmp_path):
    path = tmp_path / "pretrained.safetensors"
    export_run(ccrl_run, path, encoder="query")
    tensors = load_file(str(path))
    method = build_method(_finetune_cfg(root, f"finetune.init={path}"))
    assert method.backbone.state_dict().keys() == tensors.keys()
    assert all(torch.equal(method.backbone.state_dict()[k], v) for k, v in tensors.items())
    # The file says what network it holds: a recipe naming another backbone takes the file's.
    cfg, notes = finetune_config(load_config(recipe_path("supcam-finetune"), [
        f"data.shards={root / 'train'}", f"eval.shards={root / 'eval'}", "data.size=32", f"finetune.init={path}"]))
    assert (cfg.model.backbone, cfg.model.backbone_kwargs, cfg.model.in_chans) == ("preact_resnet18", {"width": 4}, 3)
    assert cfg.data.channels == 3 and any(note.startswith("model.backbone_kwargs=") for note in notes)
    run = train(_finetune_cfg(root, f"finetune.init={path}", f"run.dir={tmp_path / 'ft'}", "optim.lr=0.1"))
    out = tmp_path / "finetuned.safetensors"
    summary = export_run(run, out)
    assert summary["method"] == "finetune" and summary["step"] == 3
    assert not torch.equal(load_file(str(out))["stem.weight"], tensors["stem.weight"])  # it did train
    _check_same_embeddings(run, out, "query", mean=0.5, std=0.5)


def test_bad_run_dir_and_bad_out_are_one_sentence(ccrl_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="No complete checkpoint") as err:
        export_run(tmp_path / "no-such-run", tmp_path / "x.safetensors")
    assert "\n" not in str(err.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    (tmp_path / "d.safetensors").mkdir()
    for out, says in [(blocker / "x.safetensors", "Cannot write --out"), (tmp_path / "d.safetensors", "is a directory"),
                      (tmp_path / "x.pt", "must end in .safetensors")]:
        with pytest.raises(ConfigError, match=says) as err:
            export_run(ccrl_run, out)
        assert "\n" not in str(err.value) and str(out) in str(err.value)
    with pytest.raises(ConfigError, match="momentum or query"):
        export_run(ccrl_run, tmp_path / "y.safetensors", encoder="key")
    with pytest.raises(ConfigError, match="no sslkit export metadata"):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        load_backbone(tmp_path / "plain.safetensors")


def test_a_failed_write_leaves_no_half_written_file(ccrl_run, tmp_path, monkeypatch):
    out = tmp_path / "backbone.safetensors"
    out.write_bytes(b"the previous export")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sslkit.atomic.os.fsync", disk_full)
    with pytest.raises(ConfigError, match="No space left on device"):
        export_run(ccrl_run, out)
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind
    monkeypatch.undo()
    # A rebuild that does not match the run writes nothing either.
    monkeypatch.setattr(export, "_max_diff", lambda *a: (_ for _ in ()).throw(RuntimeError("mismatch")))
    with pytest.raises(RuntimeError, match="mismatch"):
        export_run(ccrl_run, out)
    assert out.read_bytes() == b"the previous export" and len(list(tmp_path.iterdir())) == 1


def test_dino_teacher_vit_for_timm(root, tmp_path):
    """The exported DINO teacher: timm rebuilds it with the image size and dynamic sizes, and it embeds as
    `sslkit evaluate` does (the class token), on 32-pixel crops and at another size."""
    run = _train(root, "dino-vit", "method.name=dino", "model.backbone=vit_tiny_patch16_224",
                 "model.backbone_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
                 "method.prototypes=32", "method.head_hidden=16", "method.head_bottleneck=8",
                 "data.views.local_crops=1", "data.views.local_size=16", "model.projector=[16,8]")
    path = tmp_path / "dino.safetensors"
    summary = export_run(run, path)
    assert summary["encoder"] == "momentum" and summary["num_features"] == 32
    assert summary["backbone_kwargs"]["img_size"] == 32 and summary["backbone_kwargs"]["dynamic_img_size"]
    _check_same_embeddings(run, path, "momentum", mean=0.5, std=0.5)
    model, _ = load_backbone(path)
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 32)  # dynamic image size: another grid works
