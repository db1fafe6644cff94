"""DINO: the teacher (no gradient, EMA), the schedules, the last-layer freeze, multi-crop views and masks
seeded per micro-batch, the in-method iBOT loss against the dense one, and 2 gloo ranks against one
process (centres, Sinkhorn-Knopp and the masked patch centre reduced over ranks)."""

import math

import numpy as np
import pytest
import torch
from two_process import compare

from sslkit.config import ConfigError, load_config
from sslkit.engine import _Inputs
from sslkit.losses import ibot_loss, teacher_probs
from sslkit.methods import build_method
from sslkit.methods.dino import vit_tokens
from sslkit.optim import build_optimizer

VIT = ["model.backbone=vit_tiny_patch16_224",
       "model.backbone_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}"]
SMALL = ["method.name=dino", "data.size=32", "data.views.local_size=16", "data.views.local_crops=2",
         "method.prototypes=64", "method.head_hidden=32", "method.head_bottleneck=16"]
# the two-process case: a ViT (LayerNorm only, so the ranks agree to float precision), iBOT on, no freeze;
# KoLeo is left out, as it is computed on each rank's own batch (so 2 x 4 is not 1 x 8)
OVERRIDES = [*SMALL, *VIT, "method.ibot=true", "method.freeze_last_layer_epochs=0", "train.max_steps=3"]
GLOBAL_BATCH, STEPS = 8, 3


def _method(*overrides: str):
    torch.manual_seed(0)
    return build_method(load_config(None, [*SMALL, *overrides]))


def _images(n: int = GLOBAL_BATCH, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def global_batches() -> list[dict]:
    """Fixed views and masks: for the concatenated global views, rows [0, 8) are view 1 and [8, 16) view 2;
    every rank's half has masked images of both views."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        mask = torch.rand(2 * GLOBAL_BATCH, 16, generator=g) < 0.4
        mask[::2, :3] = True
        mask[1::2] = False  # half of the views unmasked, as method.mask_share=0.5 makes them
        batches.append({"globals": [torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g) for _ in range(2)],
                        "locals": [torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g) for _ in range(2)],
                        "mask": mask})
    return batches


def split(batch: dict, rank: int, world: int) -> dict:
    n = GLOBAL_BATCH // world
    rows = slice(rank * n, (rank + 1) * n)
    mask = batch["mask"].view(2, GLOBAL_BATCH, -1)[:, rows].reshape(2 * n, -1)
    return {"globals": [v[rows] for v in batch["globals"]], "locals": [v[rows] for v in batch["locals"]],
            "mask": mask}


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    ranks = compare(__file__, tmp_path)
    assert ranks[0]["state"]["center"].abs().sum() > 0 and ranks[0]["state"]["patch_center"].abs().sum() > 0


def test_teacher_gets_no_gradient_and_follows_the_ema():
    method = _method(*VIT, "method.ibot=true", "method.koleo_weight=0.1")
    batch = method.prepare({"image": _images()}, torch.Generator().manual_seed(0))
    method(batch).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None for n, p in method.student.named_parameters() if "last" not in n)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in method.teacher.ema.parameters()]
    m = float(method.momentums[0])
    method.after_optimizer_step(0)
    for old, new, s in zip(before, method.teacher.ema.parameters(), method.student.parameters()):
        assert torch.allclose(new, m * old + (1 - m) * s, atol=1e-6)
    assert int(method.progress) == 1


def test_schedules_and_centre_update():
    method = _method("model.backbone_kwargs.width=4", "method.teacher_momentum=[0.99,1.0]",
                     "method.teacher_temp=[0.04,0.07]", "method.teacher_temp_warmup_epochs=2")
    method.set_run_length(101, 10)
    assert method.momentums[0] == pytest.approx(0.99) and method.momentums[-1] == pytest.approx(1.0)
    assert method.momentums[50] == pytest.approx(0.995)  # half-way along the cosine
    assert np.all(np.diff(method.momentums) >= 0)
    assert method.teacher_temps[0] == pytest.approx(0.04) and method.teacher_temps[19] == pytest.approx(0.07)
    assert np.all(method.teacher_temps[20:] == pytest.approx(0.07)) and method.freeze_steps == 10
    batch = method.prepare({"image": _images()}, torch.Generator().manual_seed(0))
    method(batch)
    with torch.no_grad():
        logits = method.teacher.ema["head"](method.teacher.ema["backbone"](torch.cat(batch["globals"])))
    method.after_optimizer_step(0)  # from a zero centre: 0.9 x 0 + 0.1 x the batch mean
    assert torch.allclose(method.center, 0.1 * logits.mean(0, keepdim=True), atol=1e-6)


def test_last_layer_is_frozen_for_its_epochs_then_trains():
    method = _method(*VIT, "optim.name=adamw", "optim.weight_decay=0.5")
    method.set_run_length(10, 2)  # freeze_last_layer_epochs=1: the first 2 steps
    optimizer = build_optimizer(load_config(None, ["optim.name=adamw", "optim.weight_decay=0.5"]).optim, model=method)
    last, first = method.student["head"].last_weight, method.student["head"].mlp[0].weight
    for step in range(3):
        before_last, before_first = last.detach().clone(), first.detach().clone()
        batch = method.prepare({"image": _images(seed=step)}, torch.Generator().manual_seed(step))
        method(batch).loss.backward()
        method.before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad()
        method.after_optimizer_step(step)
        assert not torch.equal(first, before_first)
        assert torch.equal(last, before_last) == (step < 2), step  # weight decay did not touch it either


def test_multi_crop_views_and_masks_are_seeded_per_micro_batch():
    cfg = load_config(None, [*SMALL, *VIT, "method.ibot=true", "data.views.local_crops=3"])
    method = _method(*VIT, "method.ibot=true", "data.views.local_crops=3")
    images = _images()
    one = _Inputs(method, cfg, torch.device("cpu"))({"image": images}, 5)
    again = _Inputs(method, cfg, torch.device("cpu"))({"image": images}, 5)  # a resumed run at micro-batch 5
    other = _Inputs(method, cfg, torch.device("cpu"))({"image": images}, 6)
    assert [v.shape for v in one["globals"]] == [(8, 3, 32, 32)] * 2
    assert [v.shape for v in one["locals"]] == [(8, 3, 16, 16)] * 3
    assert one["mask"].shape == (16, 16) and one["mask"].dtype == torch.bool
    for name in ("globals", "locals"):
        assert all(torch.equal(a, b) for a, b in zip(one[name], again[name]))
        assert not any(torch.equal(a, b) for a, b in zip(one[name], other[name]))
    assert torch.equal(one["mask"], again["mask"])
    masked = one["mask"].sum(1)
    assert (masked > 0).sum() == 8 and masked.max() <= math.ceil(0.5 * 16)


def test_ibot_on_masked_tokens_equals_the_dense_loss():
    method = _method(*VIT, "method.ibot=true")
    g = torch.Generator().manual_seed(3)
    s_patch, t_patch = torch.randn(4, 16, 32, generator=g), torch.randn(4, 16, 32, generator=g)
    mask = torch.rand(4, 16, generator=g) < 0.3
    mask[0] = False  # an image without a masked token adds nothing but counts in the mean (DINOv2's)
    mask[1, 0] = True
    got = method._ibot(s_patch, t_patch, mask)
    with torch.no_grad():
        temp = method._at(method.teacher_temps)
        probs = teacher_probs(method.teacher.ema["head"](t_patch), method.patch_center, temp)
    expected = ibot_loss(method.student["head"](s_patch), probs, mask, method.m.student_temp, over="all")
    assert torch.allclose(got, expected, rtol=1e-5), (got, expected)


def test_dino_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.ibot"):
        _method("model.backbone_kwargs.width=4", "method.ibot=true")
    with pytest.raises(ConfigError, match="data.views.backend"):
        load_config(None, [*SMALL, "data.views.backend=pil"])
    with pytest.raises(ConfigError, match="method.teacher_temp"):
        load_config(None, [*SMALL, "method.teacher_temp=[0.07,0.04]"])
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        build_optimizer(load_config(None, ["optim.layer_decay=0.5"]).optim,
                        model=_method("model.backbone_kwargs.width=4"))


def test_model_init_fills_student_and_teacher_and_resizes_position_embeddings(tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(5)
    source = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                               num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    method = _method(*VIT, f"model.init={path}")  # 32-pixel crops: an 8 x 8 grid becomes 4 x 4
    expected = resample_abs_pos_embed(source.pos_embed.detach(), (4, 4), (8, 8), num_prefix_tokens=1)
    for net in (method.student, method.teacher.ema):
        state = net["backbone"].state_dict()
        assert torch.equal(state["blocks.1.mlp.fc2.weight"], source.state_dict()["blocks.1.mlp.fc2.weight"])
        assert torch.allclose(state["pos_embed"], expected)
    assert method.init_report is not None


def test_vit_with_registers_and_patch_features():
    """Register tokens sit between the class token and the patches: the patch outputs, the masks and
    eval.features=patches skip them."""
    method = _method("model.backbone=vit_tiny_patch16_224", "method.ibot=true",
                     "model.backbone_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2, reg_tokens: 4}")
    vit = method.student["backbone"]
    assert vit.num_prefix_tokens == 5
    batch = method.prepare({"image": _images()}, torch.Generator().manual_seed(0))
    out = method(batch)
    assert torch.isfinite(out.loss) and out.logs["ibot_loss"] > 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(images)  # (B, 1 + 4 + 16, D)
    cls, patches = vit_tokens(vit, images)
    assert torch.allclose(cls, tokens[:, 0], atol=1e-6) and torch.allclose(patches, tokens[:, 5:], atol=1e-6)
    assert torch.allclose(method.embed(images, encoder="query", features="patches"), tokens[:, 5:].mean(1), atol=1e-6)
