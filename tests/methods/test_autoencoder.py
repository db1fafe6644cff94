"""The autoencoder method (DCAE): distributed step, loss, embedding scale, and a short run that learns."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from two_process import compare

from sslkit.config import ConfigError, load_config
from sslkit.engine import train
from sslkit.evaluate.run import evaluate_run
from sslkit.methods import build_method
from sslkit.sharding.cells.command import CellSource
from sslkit.sharding.core.runner import run_source

# No BatchNorm (its statistics depend on how the batch is split), tiny conv widths.
OVERRIDES = ["method.name=autoencoder", "method.arch=conv", "method.ae_norm=false", "data.size=16",
             "model.backbone_kwargs.widths=[4,8,8,8,6]", "model.channels_last=false"]
GLOBAL_BATCH, STEPS, SIZE = 8, 3, 16
DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input": torch.rand(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g)} for _ in range(STEPS)]


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    compare(__file__, tmp_path)


def _method(*overrides: str) -> nn.Module:
    torch.manual_seed(0)
    return build_method(load_config(None, [*OVERRIDES, *overrides]))


def test_loss_is_mse_of_the_models_own_reconstruction():
    method = _method("method.ae_norm=true").eval()
    x = torch.rand(4, 3, SIZE, SIZE)
    out = method({"input": x})
    recon = method.net(x)
    assert torch.allclose(out.loss, ((recon - x) ** 2).mean(), rtol=1e-6)
    assert torch.allclose(out.loss, F.mse_loss(recon, x), rtol=1e-6)


def test_prepare_scales_to_unit_range_and_flips_per_sample():
    images = torch.randint(0, 256, (64, 3, SIZE, SIZE), dtype=torch.uint8)
    plain = _method("data.views.flips=false").prepare({"image": images.clone()})
    assert torch.equal(plain["input"], images.float() / 255.0) and "image" not in plain
    g = torch.Generator().manual_seed(0)
    flipped = _method("data.views.flips=true", "data.views.vflip=false").prepare({"image": images.clone()}, g)["input"]
    x = images.float() / 255.0
    same, mirrored = (flipped == x).flatten(1).all(1), (flipped == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())  # every sample is itself or its horizontal mirror
    assert 10 < int(mirrored.sum()) < 54  # about half of 64 are mirrored (p = 0.5)


def test_embed_maps_normalised_images_back_to_unit_range():
    method = _method("method.ae_norm=true").eval()
    x = torch.rand(5, 3, SIZE, SIZE)
    direct = method.backbone(x)  # the encoder on [0, 1] images, as trained
    via_embed = method.embed((x - 0.5) / 0.5, encoder="momentum", features="projector")  # both ignored
    assert direct.shape == (5, method.backbone.num_features) == (5, 6)
    assert torch.allclose(via_embed, direct, atol=1e-6)
    assert not torch.allclose(method.backbone((x - 0.5) / 0.5), direct, atol=1e-3)  # the scale matters


def test_backbone_kwargs_of_another_arch_are_ignored_and_unknown_ones_refused():
    fc = _method("method.arch=fc", "method.latent=5")  # the conv widths are not the fc model's
    assert fc.backbone.num_features == 5
    with pytest.raises(ConfigError, match="model.backbone_kwargs"):
        _method("model.backbone_kwargs.width=3")


def _consep_crops(out: Path, *, tiles: int = 24) -> Path:
    """Nucleus crops (32x32, 2x window, 4 classes) from every 18th of the CoNSeP training tiles."""
    source = DATA / "consep-tiles" / "Train"
    if not source.is_dir():
        pytest.skip(f"real data not found at {source}")
    names = sorted(p.stem for p in (source / "Images").glob("*.jpg"))[::18][:tiles]
    subset = out / "tiles"
    for folder, suffix in (("Images", ".jpg"), ("Labels", ".mat")):
        (subset / folder).mkdir(parents=True)
        for name in names:
            (subset / folder / (name + suffix)).symlink_to(source / folder / (name + suffix))
    shards = out / "shards"
    run_source(CellSource(fmt="consep", input=subset, size=32, window_scale=2), shards, workers=0, progress=False)
    return shards


def test_short_run_on_consep_crops_lowers_the_loss_and_beats_random_init_on_knn(tmp_path):
    shards = _consep_crops(tmp_path)
    overrides = ["method.name=autoencoder", "method.arch=conv", "data.size=32",
                 "model.backbone_kwargs.widths=[16,32,64,64,128]", "data.views.flips=false",
                 f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", "data.batch_size=64", "data.workers=1",
                 "data.shuffle_buffer=512", "optim.lr=1e-3", "optim.weight_decay=0", "optim.schedule=constant",
                 "train.max_steps=80", "train.log_every=5", "train.ckpt_every=80", "tracker.name=none",
                 "eval.restarts=1"]
    run = train(load_config(None, overrides))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    # Evaluated on the crops it was trained on, as DCAE clusters its training patches.
    results = evaluate_run(run, device="cpu")
    trained, random_init = results["knn"]["top1"], results["baselines"]["random_init"]["knn"]["top1"]
    assert trained > random_init, (trained, random_init)
