"""The method contract: a method defined only in this file trains, evaluates (with both baselines),
reports and exports through the ordinary commands, with no other file of sslkit edited; and the
built-in methods' capabilities agree with what they build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkit.config import ConfigError, load_config, recipe_path
from sslkit.engine import train
from sslkit.evaluate.run import evaluate_run
from sslkit.export import export_run, load_backbone
from sslkit.methods import Method, StepOutput, build_method, method_class, register
from sslkit.methods.base import TwoViewInputs
from sslkit.methods.registry import BUILTIN, names
from sslkit.models import create_backbone
from sslkit.report import write_report
from sslkit.rundir import load_trained
from sslkit.sharding.synthetic import make_synthetic

TINY = ["model.backbone_kwargs.width=4", "data.batch_size=16", "data.shuffle_buffer=64", "data.workers=0",
        "tracker.name=none", "train.log_every=1", "train.eval_every=0", "method.name=toy"]


class Toy(Method):
    """Two views of a crop pulled together (cosine), one encoder: the smallest two-view method."""

    worker_views = True

    def __init__(self, *, backbone: torch.nn.Module, inputs: TwoViewInputs) -> None:
        super().__init__()
        self.net, self.inputs = backbone, inputs

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.method.tau > 1:
            raise ConfigError(f"Toy needs method.tau <= 1, got {cfg.method.tau}.")

    @property
    def backbone(self) -> torch.nn.Module:
        return self.net

    def prepare(self, batch, generator=None):
        return self.inputs(batch, generator)

    def forward(self, batch) -> StepOutput:
        q = F.normalize(self.net(batch["query"]).float(), dim=1)
        k = F.normalize(self.net(batch["key"]).float(), dim=1)
        loss = (2 - 2 * (q * k).sum(dim=1)).mean()
        return StepOutput(loss, {"loss": loss.detach()})


@register("toy", Toy)
def build_toy(cfg) -> Toy:
    m = cfg.model
    backbone = create_backbone(m.backbone, in_chans=m.in_chans, **m.backbone_kwargs)
    return Toy(backbone=backbone, inputs=TwoViewInputs(cfg))


def test_the_registry_names_the_builtins_and_the_method_registered_here():
    assert names()[:len(BUILTIN)] == tuple(BUILTIN) and "toy" in names()
    with pytest.raises(ConfigError, match="method.tau <= 1"):  # the method's own check runs in validation
        load_config(recipe_path("demo"), ["method.name=toy", "method.tau=2"])
    with pytest.raises(ConfigError, match="choose one of ccrl, supcam, scl, simclr, autoencoder, finetune, .*toy"):
        load_config(recipe_path("demo"), ["method.name=nope"])
    with pytest.raises(TypeError):
        register("plain", torch.nn.Linear)
    with pytest.raises(ValueError, match="taken by the built-in method of sslkit.methods.scl"):
        register("scl", Toy)(build_toy)  # a built-in name is not replaced, imported or not
    assert method_class("scl").__name__ == "SCL"


def test_a_method_without_forward_cannot_be_built():
    class NoStep(Method):
        backbone = None

    with pytest.raises(TypeError, match="abstract method.* forward"):
        NoStep()


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_capabilities_match_what_the_method_builds(name):
    overrides = {"scl": ["data.balanced.classes=2", "method.num_classes=3", "data.batch_size=4"],
                 "finetune": ["method.num_classes=3"], "supcam": ["method.roles=[I,T,O,TO]"],
                 "autoencoder": ["method.arch=conv", "model.backbone_kwargs={}"]}.get(name, [])
    cfg = load_config(recipe_path("demo"), [f"method.name={name}", "model.backbone_kwargs.width=4", *overrides])
    method = build_method(cfg).eval()
    cls = method_class(name)
    assert type(method) is cls and isinstance(method, Method)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = method.embed(x, encoder="query", features="backbone")
        assert torch.equal(feats, method.encoder_module("query")(x if name != "autoencoder" else x * 0.5 + 0.5))
        if cls.momentum_encoder:
            assert torch.equal(method.embed(x, encoder="momentum"), method.encoder_module("momentum")(x))
        if cls.has_classifier:
            probs = method.predict(x)
            assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
            assert torch.allclose(probs, method.classifier_net()(x).softmax(1), atol=1e-6)
        else:
            assert method.classifier_net() is None
    assert cls.needs_class_count == (name in ("scl", "finetune"))
    assert cls.worker_views == (name in ("ccrl", "simclr"))


@pytest.mark.slow
def test_a_method_defined_in_a_test_trains_evaluates_reports_and_exports(tmp_path):
    make_synthetic(tmp_path / "train", num_samples=96, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    make_synthetic(tmp_path / "eval", num_samples=64, size=32, seed=1, shard_size=64, prefix="eval", progress=False)
    cfg = load_config(recipe_path("demo"), [*TINY, f"data.shards={tmp_path / 'train'}", f"run.dir={tmp_path / 'run'}",
                                            f"eval.shards={tmp_path / 'eval'}", "train.max_steps=3"])
    run = train(cfg)
    cfg, method, state = load_trained(run)
    assert type(method) is Toy and state["step"] == 3 and cfg.method.name == "toy"

    results = evaluate_run(run, overrides=["eval.restarts=1", "eval.knn_k=5", "eval.plots=false"])
    saved = json.loads((run / "eval" / "metrics.json").read_text())
    assert saved["method"] == "TOY" and saved["momentum_encoder"] is False and "classifier" not in saved
    assert set(saved["baselines"]) >= {"raw_pixels", "random_init"}
    feats = np.load(run / "eval" / "embeddings.npy")
    assert feats.shape == (64, method.backbone.num_features) and results["num_samples"] == 64

    report = write_report(run)
    assert "TOY" in report.read_text() or "toy" in report.read_text()

    summary = export_run(run, tmp_path / "toy.safetensors")
    assert summary["method"] == "toy" and summary["encoder"] == "query" and summary["max_abs_diff"] < 1e-5
    model, info = load_backbone(tmp_path / "toy.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), method.embed(x), atol=1e-5)
