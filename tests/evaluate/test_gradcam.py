"""Grad-CAM: captum's maps against Grad-CAM worked out with autograd, boxes on hand-made maps, layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sslkit.evaluate.gradcam import default_layer, explain, gradcam_figure, gradcam_maps, influential_box, pick_examples
from sslkit.evaluate.plots import DPI
from sslkit.models import create_backbone

VERMILLION = (213, 94, 0)  # the frame and title colour of a wrong prediction


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.size


# ------------------------------------------------------------------ influential_box


def test_box_of_the_blob_holding_the_maximum():
    cam = np.zeros((12, 16))
    cam[2:5, 2:6] = 0.9  # small blob with the peak
    cam[3, 4] = 1.0
    cam[6:11, 8:15] = 0.8  # a larger blob, lower peak
    assert influential_box(cam) == (2, 2, 6, 5)  # (x0, y0, x1, y1), ends exclusive
    assert influential_box(cam, threshold=0.95) == (4, 3, 5, 4)  # only the peak pixel is left


def test_box_threshold_is_inclusive_and_regions_are_8_connected():
    cam = np.zeros((10, 10))
    cam[5, 5] = 1.0
    cam[5, 6] = 0.5  # exactly threshold * max: inside
    cam[5, 7] = 0.49  # just below: outside
    cam[6, 4] = 0.7  # touches the peak only diagonally
    assert influential_box(cam, threshold=0.5) == (4, 5, 7, 7)
    assert influential_box(cam, threshold=0.4) == (4, 5, 8, 7)
    assert influential_box(cam, threshold=1.0) == (5, 5, 6, 6)
    assert influential_box(np.zeros((4, 4))) is None  # no evidence, no box
    with pytest.raises(ValueError, match="threshold"):
        influential_box(cam, threshold=1.5)


# ------------------------------------------------------------------ gradcam_maps


def _tiny_cnn(num_classes=5):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),  # index 3: the layer explained, 6 x 6 for 12 x 12 input
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def _gradcam_by_hand(model, layer, x, targets):
    """Grad-CAM from its definition: alpha_k = mean over space of d logit / d A_k."""
    acts = []
    hook = layer.register_forward_hook(lambda m, i, out: acts.append(out))
    logits = model(x)
    hook.remove()
    a = acts[0]
    (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), a)
    alpha = grads.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
    cam = F.relu((alpha * a).sum(dim=1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak, torch.zeros_like(cam)).detach().numpy()


def test_gradcam_maps_match_the_definition():
    model = _tiny_cnn()
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 3, 1, 4, 2, 0])
    model.train()
    maps = gradcam_maps(model, x, layer=model[3], targets=targets)
    assert model.training  # the mode is restored
    assert maps.shape == (6, 12, 12) and maps.min() >= 0 and maps.max() <= 1
    expected = _gradcam_by_hand(model.eval(), model[3], x, targets)
    assert (expected.max(axis=(1, 2)) == 1).sum() >= 3  # not a trivial all-zero comparison
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    # targets=None explains the predicted class; the default layer here is the same ReLU.
    predicted = model(x).argmax(1)
    np.testing.assert_allclose(gradcam_maps(model, x), _gradcam_by_hand(model, model[3], x, predicted), atol=1e-5)


class _TopRightOnly(nn.Module):
    """A classifier whose logits depend only on the top-right quadrant of the image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2, stride=2, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.uniform_(0.1, 1.0)  # positive evidence for class 0 wherever there is signal
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        h, w = x.shape[-2:]
        mask = torch.zeros_like(x)
        mask[..., : h // 2, w // 2:] = 1
        return self.fc(self.act(self.conv(x * mask)).mean(dim=(2, 3)))


def test_box_lies_in_the_only_quadrant_that_matters():
    model = _TopRightOnly()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 0.5
    x[..., 8:, :8] = 1.0  # the brightest part of the image is where the model never looks
    cams = gradcam_maps(model, x, layer=model.act)  # predicted class: 0
    for cam in cams:
        x0, y0, x1, y1 = influential_box(cam)
        assert x0 >= 8 - 1 and y1 <= 8 + 1  # top-right, give or take the bilinear half-cell
        assert x1 > 8 and y0 < 8
        outside = cam.copy()
        outside[:9, 7:] = 0  # the quadrant and the one-pixel rim that bilinear upsampling reaches
        assert outside.max() == 0 and cam[:8, 8:].min() > 0


# ------------------------------------------------------------------ default_layer


def test_default_layer_for_preact_resnet_and_timm_resnet():
    pre = create_backbone("preact_resnet18", in_chans=1, width=8)
    assert default_layer(pre) in (getattr(pre, "final_act", None), pre.final_norm)
    res = create_backbone("resnet10t")
    assert default_layer(res) is res.layer4
    # At 32 x 32 a ResNet's last stage is 1 x 1, which cannot say where: the last map with extent wins.
    assert default_layer(res, input_size=(32, 32)) is res.layer3
    head = nn.Sequential(pre, nn.Linear(pre.num_features, 3))  # the whole classifier works too
    assert default_layer(head) in (getattr(pre, "final_act", None), pre.final_norm)


def test_default_layer_refuses_a_vision_transformer():
    vit = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)
    with pytest.raises(ValueError, match="convolutional backbone"):
        default_layer(vit)


# ------------------------------------------------------------------ figure


def test_explain_frozen_classifier_and_figure(tmp_path):
    backbone = create_backbone("preact_resnet18", in_chans=3, width=8)
    backbone.requires_grad_(False)  # a linear probe: Grad-CAM still needs gradients to the layer
    model = nn.Sequential(backbone, nn.Linear(backbone.num_features, 3))
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    cams = gradcam_maps(model, x)
    assert cams.shape == (6, 32, 32) and np.allclose(cams.max(axis=(1, 2)), 1)
    out = explain(model, images, labels=np.zeros(6, int), classes=["a", "b", "c"], out=tmp_path / "gc.png")
    _, size = _png(out)
    # 4 crops a row, each pair 2 x 1.3 + 0.3 inches wide and 1.3 + 0.75 tall, plus 0.5 for the title.
    assert size == (round(4 * 2.9 * DPI), round((2 * 2.05 + 0.5) * DPI))


def test_wrong_predictions_are_framed(tmp_path):
    images = np.full((2, 16, 16, 1), 128, np.uint8)
    cams = np.zeros((2, 16, 16))
    kw = dict(preds=np.array([0, 1]), probs=np.array([[0.9, 0.1], [0.2, 0.8]]), classes=["x", "y"])
    right, _ = _png(gradcam_figure(images, cams, [None, None], labels=np.array([0, 1]), out=tmp_path / "r.png", **kw))
    wrong, _ = _png(gradcam_figure(images, cams, [None, (2, 2, 9, 9)], labels=np.array([0, 0]),
                                   out=tmp_path / "w.png", **kw))
    assert (right == VERMILLION).all(-1).sum() == 0
    assert (wrong == VERMILLION).all(-1).sum() > 200


def test_pick_examples_wrong_first_then_correct():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    preds = np.array([0, 1, 1, 0, 2, 1, 2, 0])
    conf = np.array([0.9, 0.6, 0.8, 0.95, 0.7, 0.5, 0.9, 0.4])
    idx = pick_examples(labels, preds, conf, n=6)
    assert idx[:3].tolist() == [3, 1, 5]  # the wrong ones, most confident first
    assert set(idx[3:]) <= {0, 2, 4, 6, 7} and len(idx) == 6
    assert pick_examples(labels, preds, conf, n=2)[:1].tolist() == [3]
