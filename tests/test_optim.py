"""Parameter groups: layer-wise lr decay and the patch-embedding multiplier against timm's own layer
numbering, set_lr's scaling, and the weight-decay schedule."""

import math

import pytest
import timm
from torch import nn

from sslkit.config import load_config
from sslkit.optim import build_optimizer, build_wd_schedule, set_lr, set_weight_decay


class _WithViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32,
                                          num_heads=2, num_classes=0)
        self.head = nn.Linear(32, 4)


def _scales(optimizer) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_layer_decay_and_patch_embedding_multiplier():
    model = _WithViT()
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=1.0", "optim.weight_decay=0.1", "optim.layer_decay=0.5",
                             "optim.patch_embed_lr_mult=0.2"]).optim
    optimizer = build_optimizer(cfg, model=model)
    set_lr(optimizer, 1.0)
    got = _scales(optimizer)
    vit = model.backbone
    # depth 3: the embeddings are layer 0, block i is layer i + 1, the final norm and the head the top (4)
    assert got[id(vit.blocks[2].attn.qkv.weight)] == (0.5, 0.1)
    assert got[id(vit.blocks[0].mlp.fc1.weight)] == (0.5 ** 3, 0.1)
    assert got[id(vit.blocks[0].norm1.weight)] == (0.5 ** 3, 0.0)  # norms and biases: no weight decay
    assert got[id(vit.cls_token)] == (0.5 ** 4, 0.1)  # not a vector: decayed, as DINO's script does
    assert got[id(vit.patch_embed.proj.weight)] == (pytest.approx(0.5 ** 4 * 0.2), 0.1)
    assert got[id(vit.norm.weight)] == (1.0, 0.0) and got[id(model.head.weight)] == (1.0, 0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_plain_groups_without_decay_settings():
    model = _WithViT()
    optimizer = build_optimizer(load_config(None, ["optim.lr=0.3"]).optim, model=model)
    assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, 1.0]
    assert [g["decay"] for g in optimizer.param_groups] == [True, False]


def test_weight_decay_schedule_is_a_cosine_and_spares_the_no_decay_group():
    cfg = load_config(None, ["optim.weight_decay=0.04", "optim.weight_decay_end=0.4"]).optim
    wds = build_wd_schedule(cfg, total_steps=11)
    # the lr schedule's convention: step i of n at 0.4 + 0.5 (0.04 - 0.4) (1 + cos(pi i / n))
    expected = [0.4 - 0.18 * (1 + math.cos(math.pi * i / 11)) for i in range(11)]
    assert wds == pytest.approx(expected) and wds[0] == pytest.approx(0.04) and wds[-1] > 0.39
    assert build_wd_schedule(load_config(None, []).optim, total_steps=5) is None
    optimizer = build_optimizer(cfg, model=_WithViT())
    set_weight_decay(optimizer, 0.3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]
