"""model.init and model.pretrained: continued pretraining from a run, an exported file or a timm/PyTorch
checkpoint, for every method; key reports, position embeddings, input channels, the offline error."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from sslkit.config import ConfigError, apply_overrides, load_config, recipe_path
from sslkit.engine import train
from sslkit.export import export_run
from sslkit.methods import build_method, method_class
from sslkit.models import create_backbone
from sslkit.rundir import load_trained
from sslkit.sharding.synthetic import make_synthetic

# As tests/test_export.py: a few steps take seconds; no loader workers.
COMMON = ["data.batch_size=16", "data.shuffle_buffer=64", "data.workers=0", "tracker.name=none",
          "train.log_every=1", "optim.warmup_steps=1", "train.eval_every=0"]
TINY = ["model.backbone=preact_resnet18", "model.backbone_kwargs={width: 4}", "model.projector=[16,8]",
        "model.predictor=[8,8]", "method.queue_size=64", "data.size=32"]
METHODS = {  # method -> what else it needs to be built
    "ccrl": [], "simclr": ["data.views.recipe=local_local"], "supcam": ["method.num_classes=4"],
    "scl": ["method.num_classes=4", "data.balanced.classes=8", "data.balanced.per_class=2"],
    "finetune": ["method.num_classes=4"],
}


def _cfg(*extra: str, method: str = "ccrl"):
    return load_config(None, [*COMMON, *TINY, f"method.name={method}", *METHODS[method], *extra])


def _equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-step SimCLR run on synthetic shards, and its query backbone exported to a .safetensors file."""
    root = tmp_path_factory.mktemp("init")
    make_synthetic(root / "train", num_samples=64, size=32, seed=0, shard_size=32, prefix="train", progress=False)
    run = train(_cfg(f"data.shards={root / 'train'}", f"run.dir={root / 'simclr'}", "train.max_steps=2",
                     method="simclr"))
    path = root / "simclr.safetensors"
    export_run(run, path)
    return root, run, path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_starts_from_an_exported_file(source, method):
    _, _, path = source
    tensors = load_file(str(path))
    key = "finetune.init" if method == "finetune" else "model.init"
    built = build_method(_cfg(f"{key}={path}", method=method))
    _equal(built.backbone.state_dict(), tensors)
    for copy in built.backbone_copies():  # the key encoder of ccrl and supcam starts there too
        _equal(copy.state_dict(), tensors)
    assert bool(built.backbone_copies()) == method_class(method).momentum_encoder
    assert built.init_report["loaded"] == len(tensors) and built.init_report["key"] == key
    torch.manual_seed(0)
    scratch = build_method(_cfg(method=method))
    assert not torch.equal(scratch.backbone.stem.weight, tensors["stem.weight"])  # the check is not vacuous
    assert scratch.init_report is None


def test_ccrl_from_a_simclr_run_directory_trains_and_records_the_init(source, tmp_path):
    root, run, _ = source
    _, simclr, _ = load_trained(run)
    theirs = simclr.backbone.state_dict()
    ccrl = build_method(_cfg(f"model.init={run}"))
    _equal(ccrl.backbone.state_dict(), theirs)
    _equal(ccrl.key_encoder.ema.backbone.state_dict(), theirs)
    assert ccrl.health()["health/key_distance"] == 0.0
    # The engine: the run says where its weights came from, and a resume needs the init no more.
    init = tmp_path / "simclr-copy"
    shutil.copytree(run, init)
    cfg = _cfg(f"data.shards={root / 'train'}", f"run.dir={tmp_path / 'ccrl'}", "train.max_steps=1",
               f"model.init={init}")
    out = train(cfg)
    report = json.loads((out / "init.json").read_text())
    assert report["source"] == str(init) and report["loaded"] == len(theirs) and report["missing"] == []
    shutil.rmtree(init)
    train(apply_overrides(cfg, ["train.max_steps=2"]))  # resumes from step 1 without reading model.init
    assert load_trained(out).state["step"] == 2
    # The random-initialisation baseline of evaluation drops the init.
    assert method_class("ccrl").untrained_config(cfg).model.init is None


def test_a_pytorch_checkpoint_nested_and_prefixed(source, tmp_path):
    _, _, path = source
    tensors = load_file(str(path))
    head = {"fc.weight": torch.randn(10, 32), "fc.bias": torch.zeros(10)}  # a classifier the backbone has not
    pth = tmp_path / "model.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in {**tensors, **head}.items()}}, pth)
    built = build_method(_cfg(f"model.init={pth}"))
    _equal(built.backbone.state_dict(), tensors)
    assert built.init_report["found"] == "state_dict, prefix 'module.'"
    assert sorted(built.init_report["dropped_classifier"]) == ["fc.bias", "fc.weight"]
    # DINO-style: a student and a teacher, each with a head beside the backbone: the teacher's backbone.
    teacher = {k: v + 1 for k, v in tensors.items() if v.is_floating_point()} | \
              {k: v for k, v in tensors.items() if not v.is_floating_point()}
    dino = tmp_path / "dino.ckpt"
    torch.save({"student": {f"module.backbone.{k}": v for k, v in tensors.items()} | {"module.head.w": torch.ones(3)},
                "teacher": {f"backbone.{k}": v for k, v in teacher.items()} | {"head.w": torch.ones(3)},
                "args": {"lr": 0.1}}, dino)
    built = build_method(_cfg(f"model.init={dino}", method="simclr"))
    _equal(built.backbone.state_dict(), teacher)
    assert built.init_report["found"] == "teacher, prefix 'backbone.'" and built.init_report["left_out"] == 1


def test_key_reports_strict_and_not(source, tmp_path, caplog):
    _, _, path = source
    tensors = load_file(str(path))
    broken = dict(tensors)
    del broken["stem.weight"]
    broken["extra.weight"] = torch.ones(2)
    broken["blocks.0.conv1.weight"] = torch.ones(5, 4, 3, 3)  # another shape, nothing to adapt it with
    bad = tmp_path / "bad.safetensors"
    save_file(broken, str(bad))
    with pytest.raises(ConfigError) as err:
        build_method(_cfg(f"model.init={bad}"))
    message = str(err.value)
    assert "\n" not in message and message.endswith(".")
    assert message.startswith(f"The weights in model.init '{bad}' do not fit model.backbone=preact_resnet18")
    for part in ("1 missing (stem.weight)", "1 unexpected (extra.weight)",
                 "1 of another shape (blocks.0.conv1.weight (5, 4, 3, 3) -> (4, 4, 3, 3))", "model.init_strict=false"):
        assert part in message, message
    torch.manual_seed(1)
    with caplog.at_level(logging.WARNING, logger="sslkit.models.init"):
        built = build_method(_cfg(f"model.init={bad}", "model.init_strict=false"))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"loaded {len(tensors) - 2} of {len(tensors)} tensors" in warning
    assert "stem.weight" in warning and "extra.weight" in warning and "blocks.0.conv1.weight" in warning
    ours = built.backbone.state_dict()
    for name, value in tensors.items():
        assert torch.equal(ours[name], value) == (name not in ("stem.weight", "blocks.0.conv1.weight")), name
    _equal(built.key_encoder.ema.backbone.state_dict(), ours)  # the copy equals the backbone, random parts too
    # Nothing that fits at all is an error either way.
    none = tmp_path / "none.safetensors"
    save_file({"a.b": torch.ones(1)}, str(none))
    with pytest.raises(ConfigError, match="hold no tensor of model.backbone=preact_resnet18"):
        build_method(_cfg(f"model.init={none}", "model.init_strict=false"))


VIT = {"depth": 1, "patch_size": 8, "embed_dim": 24, "num_heads": 2}


@pytest.mark.parametrize("kwargs, prefix", [({}, 1), ({"reg_tokens": 2}, 3),
                                            ({"reg_tokens": 1, "no_embed_class": True}, 0)])
def test_vit_position_embedding_is_resampled_to_the_new_grid(tmp_path, kwargs, prefix):
    small = create_backbone("vit_tiny_patch16_224", img_size=32, **VIT, **kwargs)
    theirs = small.state_dict()
    assert theirs["pos_embed"].shape == (1, prefix + 16, 24)
    path = tmp_path / "vit.safetensors"
    save_file(theirs, str(path))
    arch = json.dumps({"img_size": 64, **VIT, **kwargs})
    built = build_method(_cfg(f"model.init={path}", "model.backbone=vit_tiny_patch16_224", "data.size=64",
                              f"model.backbone_kwargs={arch}", method="simclr"))
    ours = built.backbone.state_dict()
    assert ours["pos_embed"].shape == (1, prefix + 64, 24)
    expected = resample_abs_pos_embed(theirs["pos_embed"], new_size=[8, 8], num_prefix_tokens=prefix)
    assert torch.equal(ours["pos_embed"], expected)
    assert torch.equal(ours["pos_embed"][:, :prefix], theirs["pos_embed"][:, :prefix])  # cls and registers as they were
    assert not torch.equal(ours["pos_embed"][:, prefix:prefix + 16], theirs["pos_embed"][:, prefix:])
    for name, value in theirs.items():
        if name != "pos_embed":
            assert torch.equal(ours[name], value), name
    assert built.init_report["adapted"] == [f"pos_embed (1, {prefix + 16}, 24) -> (1, {prefix + 64}, 24)"]
    assert built(_two_views(64)).loss.isfinite()


def _two_views(size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"query": torch.randn(4, 3, size, size, generator=g), "key": torch.randn(4, 3, size, size, generator=g)}


def test_one_channel_from_three_sums_the_first_convolution(source):
    _, _, path = source
    tensors = load_file(str(path))
    built = build_method(_cfg(f"model.init={path}", "model.in_chans=1", "data.channels=1"))
    rgb = tensors["stem.weight"]  # (4, 3, 3, 3)
    assert torch.equal(built.backbone.stem.weight, rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3])
    _equal({k: v for k, v in built.backbone.state_dict().items() if k != "stem.weight"},
           {k: v for k, v in tensors.items() if k != "stem.weight"})
    _equal(built.key_encoder.ema.backbone.state_dict(), built.backbone.state_dict())


def test_pretrained_without_a_network_says_how_to_give_the_file(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read when the package was imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for backbone in ("resnet18", "preact_resnet18"):  # published weights not in the cache; none published
        with pytest.raises(ConfigError) as err:
            build_method(_cfg(f"model.backbone={backbone}", "model.backbone_kwargs={}", "model.pretrained=true"))
        message = str(err.value)
        assert "\n" not in message and message.endswith(".")
        assert message.startswith(f"Config key 'model.pretrained' is true but timm could not load its published "
                                  f"weights for '{backbone}'")
        assert "set model.init=/path/to/weights" in message and "HF_HUB_OFFLINE=1" in message


@pytest.mark.parametrize("override, message", [
    ("model.init=no/such/file.pth", "Config key 'model.init' is 'no/such/file.pth', which does not exist; give a run "
     "directory, a .safetensors file or a checkpoint file (.pth, .pt, .bin, .ckpt), or null to start from a random "
     "initialisation (set by override 'model.init=no/such/file.pth')."),
    ("model.init=pyproject.toml", "Config key 'model.init' is 'pyproject.toml', which is not a run directory"),
    ("model.init=[a]", "Config key 'model.init' in override 'model.init=[a]' must be a string or null, got ['a']."),
    ("model.init_strict=maybe", "Config key 'model.init_strict' in override 'model.init_strict=maybe' must be true "
     "or false, got 'maybe'."),
    ("model.pretrained=[1]", "Config key 'model.pretrained' in override 'model.pretrained=[1]' must be true or false"),
])
def test_bad_init_keys_are_one_sentence_naming_the_key(override, message, monkeypatch, tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(recipe_path("demo"), [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_one_source_of_first_weights(source, tmp_path):
    _, run, path = source
    with pytest.raises(ConfigError, match=r"'model.pretrained' \(true\) and 'model.init' .* both give"):
        load_config(recipe_path("demo"), [f"model.init={path}", "model.pretrained=true"])
    with pytest.raises(ConfigError, match="'finetune.init' and 'model.init' both give"):
        _cfg(f"finetune.init={run}", f"model.init={path}", method="finetune")
    # A stored config whose init has gone is still valid (evaluation re-validates it); building it fresh is not.
    gone = tmp_path / "gone.safetensors"
    shutil.copy(path, gone)
    cfg = _cfg(f"model.init={gone}")
    gone.unlink()
    assert apply_overrides(cfg, ["eval.k=3"]).model.init == str(gone)
    with pytest.raises(ConfigError, match="'model.init' is .*, which does not exist"):
        build_method(cfg)
    assert build_method(cfg, init=False).init_report is None


@pytest.mark.parametrize("arch, kwargs", [("conv", "{widths: [4, 8, 8, 8, 6]}"),
                                          ("resnet", "{channels: [8, 8, 8, 8]}")])
def test_an_autoencoder_from_its_exported_encoder(tmp_path, arch, kwargs):
    """The exported timm encoder of arch=resnet has the backbone's keys without the wrapper's 'body.model.'."""
    from sslkit.models.autoencoders import timm_encoder

    overrides = ["method.name=autoencoder", f"method.arch={arch}", f"model.backbone_kwargs={kwargs}", "method.latent=6"]
    torch.manual_seed(2)
    first = build_method(load_config(None, overrides))
    module, _, _ = timm_encoder(first.net)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    built = build_method(load_config(None, [*overrides, f"model.init={path}"]))
    _equal(built.backbone.state_dict(), first.backbone.state_dict())
    assert built.init_report["found"] == ("the top level, keys prefixed with 'body.model.'" if arch == "resnet"
                                          else "the top level")
    with pytest.raises(ConfigError, match="'model.pretrained' is true, but the autoencoder's encoder"):
        load_config(None, [*overrides, "model.pretrained=true"])


class _RunsCode:
    """Unpickled without weights_only, this would write the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_runs_nothing(source, tmp_path):
    _, _, path = source
    marker, bad = tmp_path / "ran", tmp_path / "tampered.pth"
    torch.save({"state_dict": load_file(str(path)), "extra": _RunsCode(str(marker))}, bad)
    with pytest.raises(ConfigError, match=r"'model.init' is .*tampered.pth', which torch cannot read as tensors alone"):
        build_method(_cfg(f"model.init={bad}"))
    assert not marker.exists()
