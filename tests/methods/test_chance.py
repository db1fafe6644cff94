"""Method.chance_loss: with embeddings that carry no information (one image everywhere, so every
embedding is the same) each method's own loss equals the chance value it reports."""

from __future__ import annotations

import math

import pytest
import torch

from sslkit.config import load_config
from sslkit.methods import build_method

TINY = ["model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]", "model.embed_dim=8",
        "data.size=16", "model.channels_last=false"]
B = 6


def _method(*overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(load_config(None, [*TINY, *overrides])).train()


def _same(n: int = B) -> torch.Tensor:
    """n copies of one random image: every embedding of a batch is then the same."""
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)).expand(n, -1, -1, -1).clone()


def test_simclr_chance_is_log_of_2n_minus_1():
    method = _method("method.name=simclr", "method.tau=0.5")
    assert method.chance_loss() is None  # before any forward
    out = method({"query": _same(), "key": _same()})
    assert method.chance_loss() == pytest.approx(math.log(2 * B - 1))
    assert float(out.loss.detach()) == pytest.approx(method.chance_loss(), rel=1e-5)


@pytest.mark.parametrize("in_batch", [True, False])
def test_ccrl_chance_is_log_of_the_candidate_keys(in_batch):
    method = _method("method.name=ccrl", "method.queue_size=16", "method.tau=0.2", "method.use_predictor=true",
                     f"method.in_batch_negatives={str(in_batch).lower()}")
    batch = {"query": _same(), "key": _same()}
    candidates = []
    for _ in range(4):  # the queue fills (0, 6, 12 keys, then full at 16): the chance value grows with it
        out = method(dict(batch))
        queued = int(method.queue.filled)
        candidates.append((B if in_batch else 1) + queued)
        assert method.chance_loss() == pytest.approx(math.log(candidates[-1]))
        assert float(out.loss.detach()) == pytest.approx(method.chance_loss(), rel=1e-5, abs=1e-6)
        method.after_optimizer_step(0)  # enqueue this step's keys (all equal to the batch's)
    assert candidates == ([6, 12, 18, 22] if in_batch else [1, 7, 13, 17])


@pytest.mark.parametrize("self_margin", [True, False])
def test_supcam_chance_depends_on_the_labels_as_derived(self_margin):
    method = _method("method.name=supcam", "method.queue_size=12", "method.tau=0.2", "method.margin=0.3",
                     f"method.use_self_margin={str(self_margin).lower()}")
    labels, composite_labels = torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor([1, 1, 3, 3, 3, 2])
    batch = {"query": _same(), "key": _same(), "composite": _same(), "label": labels,
             "composite_label": composite_labels}
    out = method(dict(batch))
    # The keys: the six k+ and the six k_g (the queue is empty); n_i = keys of another label than query i.
    key_labels = torch.cat([labels, composite_labels])
    n = [(key_labels != y).sum().item() for y in labels]
    expected = sum(math.log1p(k) for k in n) / B
    if self_margin:
        gap = (1 - math.cos(math.acos(1 - 1e-7) + 0.3)) / 0.2
        expected += sum(math.log1p(k * math.exp(gap)) for k in n) / B
    assert method.chance_loss() == pytest.approx(expected, rel=1e-9)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_finetune_chance_is_log_k(smoothing):
    method = _method("method.name=finetune", "method.num_classes=5", f"finetune.label_smoothing={smoothing}",
                     "finetune.init=null")
    torch.nn.init.zeros_(method.head.weight)
    torch.nn.init.zeros_(method.head.bias)  # equal logits: a uniform prediction
    out = method({"input": torch.randn(B, 3, 16, 16), "label": torch.tensor([0, 1, 2, 3, 4, 0])})
    assert method.chance_loss() == pytest.approx(math.log(5))
    assert float(out.loss.detach()) == pytest.approx(math.log(5), rel=1e-6)


@pytest.mark.parametrize("name", ["scl", "autoencoder"])
def test_methods_without_a_chance_value_say_none(name):
    extra = (["data.balanced.classes=3", "data.batch_size=6", "method.num_classes=3"] if name == "scl"
             else ["model.backbone_kwargs={}"])
    assert _method(f"method.name={name}", *extra).chance_loss() is None
