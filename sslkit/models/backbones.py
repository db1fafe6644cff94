"""Backbones come from timm by name; sslkit adds one family to timm's registry.

``preact_resnet18`` is the pre-activation ResNet-18 that CCRL uses for 32x32 cell crops:
a 3x3 stride-1 stem and no max-pool, so a 32x32 crop reaches the last stage at 4x4.
It is registered with timm when ``sslkit.models`` is imported, so
``timm.create_model("preact_resnet18", num_classes=0)`` builds it like any other model
and follows timm's contract (``num_features``, ``num_classes``, ``forward_features``,
``forward_head``, ``reset_classifier``); weights written by ``sslkit export`` load with
``pretrained=True, pretrained_cfg_overlay=dict(file=...)``. ``width`` scales every stage
(64 is the paper's; 16 or 32 trade accuracy for CPU speed).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from sslkit.config import ConfigError


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # batch-independent: used where ranks must see identical statistics
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"Unknown norm '{kind}' for preact_resnet; use 'batch' or 'group'.")


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, norm: str) -> None:
        super().__init__()
        self.bn1 = _norm(norm, in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn2 = _norm(norm, out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small inputs. (B, C, H, W) -> (B, 8 * width) after pooling."""

    def __init__(
        self, *, layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, in_chans: int = 3,
        num_classes: int = 1000, norm: str = "batch", drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(len(layers))]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        in_chs = widths[0]
        for stage, (depth, out_chs) in enumerate(zip(layers, widths)):
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(PreActBlock(in_chs, out_chs, stride, norm))
                in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = _norm(norm, in_chs)
        self.num_features = in_chs
        self.drop_rate = drop_rate
        self.reset_classifier(num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.final_norm(self.blocks(self.stem(x))))  # (B, F, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (B, F)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # sslkit's input: the whole crop resized to 32x32 (bilinear, no crop), (x - 0.5) / 0.5.
    # No url: weights come from ``sslkit export`` files, pretrained_cfg_overlay=dict(file=...).
    return {"url": "", "num_classes": 1000, "input_size": (3, 32, 32), "pool_size": (4, 4),
            "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "stem",
            "classifier": "fc", **kwargs}


def _create(variant: str, pretrained: bool, layers: tuple[int, ...], **kwargs: Any) -> PreActResNet:
    return build_model_with_cfg(
        PreActResNet, variant, pretrained, layers=layers, feature_cfg={"flatten_sequential": True}, **kwargs,
    )


# timm's registry reads this module-level table when the models below are registered.
default_cfgs = generate_default_cfgs({"preact_resnet18.untrained": _cfg(), "preact_resnet34.untrained": _cfg()})


if "preact_resnet18" not in timm.list_models("preact_resnet*"):

    @register_model
    def preact_resnet18(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
        """Pre-activation ResNet-18 for 32x32 crops (CCRL)."""
        return _create("preact_resnet18", pretrained, (2, 2, 2, 2), **kwargs)

    @register_model
    def preact_resnet34(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
        """Pre-activation ResNet-34 for small crops."""
        return _create("preact_resnet34", pretrained, (3, 4, 6, 3), **kwargs)


def create_backbone(name: str, *, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A timm model with its classifier removed: (B, C, H, W) -> (B, num_features)."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err) or not kwargs:
            raise
        raise ConfigError(f"Backbone '{name}' does not take {err.args[0].rsplit(' ', 1)[-1]} (model.backbone_kwargs "
                          f"is {kwargs}); set model.backbone_kwargs={{}} or give it the arguments {name} "
                          "takes.") from None
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"Unknown backbone '{name}' (model.backbone); use a timm model name.{hint}") from None
