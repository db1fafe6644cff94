"""Grad-CAM heat maps of a classifier, computed with captum, and a figure of them.

Grad-CAM (Selvaraju et al., 2017) weighs each channel k of a convolutional layer's
output A by the mean over space of d logit / d A_k and keeps ReLU(sum_k alpha_k A_k):
the regions that raise the explained class's logit. captum's ``LayerGradCam`` computes
it; this module picks the layer, upsamples and normalises the maps, finds the most
influential region and draws them.

The model to explain maps normalised images to logits. From a run with a classifier head
(fine-tuning, SCL)::

    cfg, method, _ = load_trained(run_dir)          # sslkit.rundir
    model = method.classifier_net()

(``method.predict`` returns probabilities under ``no_grad``, so it cannot be differentiated;
``classifier_net`` can, even when fine-tuning froze the backbone's parameters.)
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from skimage.measure import label as connected_regions
from torch import Tensor, nn

from sslkit.data.augment import normalize
from sslkit.evaluate.plots import save_png

__all__ = ["default_layer", "explain", "gradcam_figure", "gradcam_maps", "influential_box", "pick_examples"]

WRONG = "#D55E00"  # Okabe-Ito vermillion: marks wrong predictions
BOX = "#00E5FF"  # cyan stands out on the inferno heat map


class _EvalMode:
    """Put every submodule in eval mode (BatchNorm statistics, dropout) and restore each one after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.modes:
            m.training = mode


def _probe_input(model: nn.Module, input_size: Sequence[int] | None) -> Tensor:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"Grad-CAM needs a convolutional backbone, but {type(model).__name__} has no Conv2d layer.")
    if input_size is None:  # a fixed-size model (timm's patch embedding) first, then timm's default size
        fixed = [tuple(m.img_size) for m in model.modules() if isinstance(getattr(m, "img_size", None), tuple)]
        cfgs = [getattr(m, "pretrained_cfg", None) for m in model.modules()]
        sizes = fixed + [cfg["input_size"][-2:] for cfg in cfgs if isinstance(cfg, dict) and cfg.get("input_size")]
        input_size = sizes[0] if sizes else (64, 64)
    param = next(model.parameters())
    return torch.zeros(1, convs[0].in_channels, *input_size, device=param.device, dtype=param.dtype)


def default_layer(backbone: nn.Module, *, input_size: Sequence[int] | None = None) -> nn.Module:
    """The last submodule whose output is a spatial map (B, C, h, w) with h, w >= 2.

    Found by running one blank image through ``backbone`` (in eval mode, without
    gradients) and watching every submodule's output. Maps of 1 x 1 (squeeze-excite
    gates, global pools, or the last stage of a ResNet on 32-pixel crops) say nothing
    about where, so the last map with some extent wins; only when there is none is the
    last 4-D output taken. For sslkit's preact_resnet18 this is ``final_norm`` and for
    timm ResNets ``layer4`` (at the default input size).

    Args:
        backbone: a CNN (or a whole classifier built on one).
        input_size: (H, W) of the probe image; default a fixed-size model's
            ``img_size``, else timm's ``pretrained_cfg`` input size, else 64 x 64.
            Pass the real size: a ResNet's last stage is 7 x 7 at 224 but 1 x 1 at 32.
            :func:`gradcam_maps` with ``layer=None`` does.

    Raises:
        ValueError: for a transformer (token outputs after the patch embedding).
    """
    example = _probe_input(backbone, input_size)
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []

    def record(mod: nn.Module, _: Any, out: Any) -> None:
        seen.append((mod, tuple(out.shape) if isinstance(out, Tensor) else ()))

    hooks = [m.register_forward_hook(record) for name, m in backbone.named_modules() if name]
    try:
        with _EvalMode(backbone), torch.no_grad():
            backbone(example)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"Could not run a {tuple(example.shape)} probe image through {type(backbone).__name__} "
                         f"({err}); pass input_size=(H, W) of the images it takes.") from None
    finally:
        for h in hooks:
            h.remove()
    maps = [i for i, (_, shape) in enumerate(seen) if len(shape) == 4]
    if not maps:
        raise ValueError(f"Grad-CAM needs a convolutional layer, but no submodule of {type(backbone).__name__} "
                         "outputs a (B, C, h, w) map.")
    if any(len(shape) == 3 for _, shape in seen[maps[-1] + 1:]):
        raise ValueError(f"Grad-CAM needs a convolutional backbone, but {type(backbone).__name__} turns the image "
                         "into tokens (a vision transformer); explain a CNN (e.g. model.backbone=resnet18).")
    spatial = [i for i in maps if min(seen[i][1][2:]) >= 2]
    return seen[(spatial or maps)[-1]][0]


def gradcam_maps(model: nn.Module, images: Any, *, layer: nn.Module | None = None, targets: Any | None = None,
                 batch_size: int = 64) -> np.ndarray:
    """Grad-CAM of each image for one class, upsampled to the image and scaled to [0, 1].

    Args:
        model: normalised images (N, C, H, W) -> logits (N, K), e.g.
            ``nn.Sequential(method.backbone, method.head)`` (see the module docstring).
        images: (N, C, H, W) float images, normalised as the model was trained.
        layer: the convolutional layer to explain; default :func:`default_layer`.
        targets: (N,) class indices to explain; None: each image's predicted class.

    Returns:
        (N, H, W) float32: ReLU(sum_k alpha_k A_k) upsampled bilinearly and divided by
        its maximum, so 1 marks the most influential pixel (all zeros: no evidence).
    """
    x = torch.as_tensor(images)
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"images must be (N, C, H, W) normalised floats, got {tuple(x.shape)} {x.dtype}; "
                         "convert uint8 crops with sslkit.data.augment.normalize(x / 255).")
    device = next(model.parameters()).device
    layer = layer if layer is not None else default_layer(model, input_size=x.shape[-2:])
    if targets is not None:
        targets = (targets if isinstance(targets, Tensor) else torch.as_tensor(np.asarray(targets))).long().reshape(-1)
        if targets.numel() != x.shape[0]:
            raise ValueError(f"targets must hold one class per image ({x.shape[0]}), got {targets.numel()}.")
    cam = LayerGradCam(model, layer)
    maps = []
    with _EvalMode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i: i + batch_size].to(device)
            if targets is None:
                with torch.no_grad():
                    tb = model(xb).argmax(dim=1)
            else:
                tb = targets[i: i + batch_size].to(device)
            attr = cam.attribute(xb, target=tb, relu_attributions=True)  # (B, 1, h, w)
            up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
            maps.append(up[:, 0].detach().float().cpu())
    out = torch.cat(maps).clamp_min(0)
    peak = out.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, out / peak.clamp_min(1e-12), torch.zeros_like(out)).numpy()


def influential_box(cam: Any, *, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """Bounding box of the connected region of ``cam >= threshold * max`` that holds the maximum.

    Regions are 8-connected (skimage.measure.label). Returns (x0, y0, x1, y1) in pixels
    with exclusive ends, so ``cam[y0:y1, x0:x1]`` is the box; None when the map has no
    positive value (nothing influenced the class).
    """
    m = np.asarray(cam, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"cam must be an (H, W) map, got shape {m.shape}.")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a fraction of the peak in [0, 1], got {threshold}.")
    peak = float(np.max(m))
    if not np.isfinite(peak) or peak <= 0:
        return None
    regions = connected_regions(m >= threshold * peak, connectivity=2)
    r, c = np.unravel_index(np.argmax(m), m.shape)
    ys, xs = np.nonzero(regions == regions[r, c])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _show(ax: Any, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()


def gradcam_figure(images: Any, cams: Any, boxes: Sequence[tuple[int, int, int, int] | None], *,
                   labels: Any | None, preds: Any, probs: Any, classes: Sequence[str], out: str | Path,
                   per_row: int = 4, threshold: float = 0.5) -> Path:
    """Each crop beside its Grad-CAM overlay with the influential box, titled by its prediction.

    Args:
        images: (N, H, W, C) uint8 crops (C = 1 drawn in grey, or 3).
        cams: (N, H, W) maps in [0, 1] from :func:`gradcam_maps`.
        boxes: N boxes from :func:`influential_box` (None: no box).
        labels: (N,) true classes, or None when unknown.
        preds: (N,) predicted classes; probs: (N,) their probabilities, or (N, K).
        threshold: the box threshold used, quoted in the title.

    Wrong predictions get a "WRONG" title and a vermillion frame (not colour alone).
    """
    imgs = np.asarray(images)
    imgs = imgs[..., None] if imgs.ndim == 3 else imgs
    maps, preds = np.asarray(cams), np.asarray(preds).astype(int)
    p = np.asarray(probs, dtype=float)
    p = p[np.arange(len(preds)), preds] if p.ndim == 2 else p
    n = imgs.shape[0]
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or maps.shape != imgs.shape[:3] or len(boxes) != n:
        raise ValueError(f"gradcam_figure needs (N, H, W, C) uint8 images, (N, H, W) cams and N boxes; got "
                         f"{imgs.shape} {imgs.dtype}, {maps.shape} and {len(boxes)} boxes.")
    ncols, nrows = min(per_row, n), -(-n // per_row)
    panel = 1.3 if imgs.shape[1] <= 128 else 1.7
    fig = Figure(figsize=(ncols * (2 * panel + 0.3), nrows * (panel + 0.75) + 0.5), layout="constrained")
    subs = np.atleast_1d(fig.subfigures(nrows, ncols, squeeze=False).ravel())
    for i, sf in enumerate(subs):
        if i >= n:
            continue
        wrong = labels is not None and int(np.asarray(labels)[i]) != preds[i]
        truth = f"true: {classes[int(np.asarray(labels)[i])]}\n" if labels is not None else ""
        sf.suptitle(("WRONG: " if wrong else "") + f"{truth}predicted: {classes[preds[i]]} ({p[i]:.2f})",
                    fontsize=8, color=WRONG if wrong else "black", fontweight="bold" if wrong else "normal")
        if wrong:
            sf.patch.set_edgecolor(WRONG)
            sf.patch.set_linewidth(3)
        left, right = sf.subplots(1, 2)
        _show(left, imgs[i])
        _show(right, imgs[i])
        right.imshow(maps[i], cmap="inferno", vmin=0, vmax=1, alpha=0.5, interpolation="nearest")
        if boxes[i] is not None:
            x0, y0, x1, y1 = boxes[i]
            right.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=BOX, lw=2))
    text = (f"Grad-CAM of the predicted class on {n} crops: each crop, then its heat map (bright = raised the "
            f"prediction most; box = the connected region >= {threshold:.0%} of the peak)")
    fig.suptitle("\n".join(textwrap.wrap(text, int(fig.get_figwidth() * 14))), fontsize=9)
    return save_png(fig, out)


def pick_examples(labels: Any, preds: Any, probs: Any, *, n: int = 16, seed: int = 0) -> np.ndarray:
    """Indices of up to ``n`` crops to explain: up to half the most confident wrong predictions, the rest
    a seeded random sample of the correct ones (so a reader sees both how it errs and how it succeeds)."""
    y, yp = np.asarray(labels).astype(int), np.asarray(preds).astype(int)
    p = np.asarray(probs, dtype=float)
    conf = p[np.arange(len(yp)), yp] if p.ndim == 2 else p
    wrong, right = np.flatnonzero(y != yp), np.flatnonzero(y == yp)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][: n // 2]
    rng = np.random.default_rng(seed)
    right = rng.permutation(right)[: n - len(wrong)]
    return np.concatenate([wrong, np.sort(right)]).astype(np.int64)


def explain(model: nn.Module, images: Any, *, labels: Any | None, classes: Sequence[str], out: str | Path,
            layer: nn.Module | None = None, threshold: float = 0.5) -> Path:
    """uint8 crops (N, H, W, C) -> predictions, Grad-CAM maps, boxes and :func:`gradcam_figure`."""
    imgs = np.asarray(images)
    imgs = imgs[..., None] if imgs.ndim == 3 else imgs
    x = normalize(torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 255.0)
    device = next(model.parameters()).device
    with _EvalMode(model), torch.no_grad():
        probs = model(x.to(device)).float().softmax(dim=1).cpu().numpy()
    preds = probs.argmax(axis=1)
    cams = gradcam_maps(model, x, layer=layer, targets=preds)
    boxes = [influential_box(c, threshold=threshold) for c in cams]
    return gradcam_figure(imgs, cams, boxes, labels=labels, preds=preds, probs=probs, classes=classes, out=out,
                          threshold=threshold)
