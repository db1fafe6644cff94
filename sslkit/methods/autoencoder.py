"""DCAE: an autoencoder's bottleneck as features for k-means (Liu & Zhang, 2021).

Training: the image in [0, 1] (uint8 / 255, optionally flipped, ``data.views.flips`` and
``vflip``) is reconstructed through the bottleneck; the loss is the mean squared error
between the sigmoid output and the input, as in the paper. Architectures by
``method.arch`` (fc | conv | conv_pool | resnet), built in ``sslkit.models.autoencoders``
(the module docstring lists each decision the paper left open); ``model.backbone_kwargs``
goes to that builder (``widths`` of the conv models, ``hidden`` of fc, ``backbone`` (a timm
ResNet name, default resnet18) and timm arguments such as ``channels`` of resnet).

Evaluation: ``embed`` receives images at the evaluation scale (x - 0.5) / 0.5, maps them
back to [0, 1] (the scale the encoder was trained on) and returns the flat bottleneck
(B, num_features). An autoencoder has one encoder and no projector, so ``encoder`` and
``features`` are accepted (the evaluation calls every method the same way) and ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.config import Config, ConfigError
from sslkit.data.augment import MEAN, STD
from sslkit.methods.base import Exported, Method, StepOutput, register
from sslkit.models.autoencoders import Autoencoder as Net
from sslkit.models.autoencoders import create_autoencoder, timm_encoder


class AutoencoderMethod(Method):
    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.model.pretrained:
            raise ConfigError("Config key 'model.pretrained' is true, but the autoencoder's encoder is not "
                              "model.backbone and timm publishes no weights for it; give its weights with "
                              "model.init (a run directory or an exported file) instead.")

    def __init__(self, *, net: Net, flips: bool = False, vflip: bool = True) -> None:
        super().__init__()
        self.net = net
        self.flips, self.vflip = flips, vflip

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """uint8 ``image`` (B, C, H, W) -> ``input`` float in [0, 1], randomly flipped per sample."""
        if "image" not in batch:
            return batch
        x = batch.pop("image")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.flips:
            n = x.shape[0]
            coin = torch.rand(n, generator=generator, device=x.device) < 0.5
            x = torch.where(coin.view(-1, 1, 1, 1), x.flip(-1), x)
            if self.vflip:
                coin = torch.rand(n, generator=generator, device=x.device) < 0.5
                x = torch.where(coin.view(-1, 1, 1, 1), x.flip(-2), x)
        batch["input"] = x
        return batch

    def forward(self, batch: dict[str, Tensor]) -> StepOutput:
        x = batch["input"]  # (B, C, H, W) in [0, 1]; the target is the input itself
        recon = self.net(x)  # (B, C, H, W), sigmoid output
        loss = F.mse_loss(recon.float(), x.float())
        return StepOutput(loss, {"loss": loss.detach()})

    def after_optimizer_step(self, step: int) -> None:
        """Nothing to update outside the optimizer."""

    @torch.no_grad()
    def embed(self, images: Tensor, *, encoder: str = "query", features: str = "backbone") -> Tensor:
        """(N, C, H, W) normalised as (x - 0.5) / 0.5 -> (N, num_features) bottleneck features."""
        return self.net.encoder(images * STD + MEAN)

    @property
    def backbone(self) -> nn.Module:
        """The encoder: (B, C, H, W) in [0, 1] -> (B, num_features)."""
        return self.net.encoder

    def export_spec(self, cfg: Config, encoder: str = "query") -> Exported:
        """The encoder as a timm model; it takes [0, 1] images (``embed`` maps (x - 0.5) / 0.5 back)."""
        module, name, kwargs = timm_encoder(self.net)
        return Exported(module, name, kwargs, cfg.data.channels, 0.0, 1.0)


_OWN_KWARGS = {"fc": {"hidden"}, "conv": {"widths"}, "conv_pool": {"widths"}}  # resnet: backbone + timm arguments


@register("autoencoder", AutoencoderMethod)
def build_autoencoder(cfg: Config) -> AutoencoderMethod:
    """Input channels and size from data.channels and data.size (the reconstruction's shape).

    ``model.backbone_kwargs`` meant for another arch (``widths``, ``hidden``) are ignored, so
    ``method.arch`` can be switched on the command line of a recipe that sets them."""
    arch = cfg.method.arch
    own = _OWN_KWARGS.get(arch, set())
    kwargs = {k: v for k, v in cfg.model.backbone_kwargs.items() if k in own or k not in ("hidden", "widths")}
    unknown = sorted(set(kwargs) - own) if arch in _OWN_KWARGS else []
    if unknown:
        raise ConfigError(f"Config key 'model.backbone_kwargs' holds {unknown}, which method.arch={arch} does not "
                          f"take; give it only {', '.join(sorted(_OWN_KWARGS[arch]))} (or nothing).")
    kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}
    net = create_autoencoder(arch, in_chans=cfg.data.channels, size=cfg.data.size, latent=cfg.method.latent,
                             norm=cfg.method.ae_norm, **kwargs)
    return AutoencoderMethod(net=net, flips=cfg.data.views.flips, vflip=cfg.data.views.vflip)
