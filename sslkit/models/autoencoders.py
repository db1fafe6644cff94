"""DCAE's autoencoders (Liu & Zhang, 2021): images in [0, 1] -> a
bottleneck -> a sigmoid reconstruction of exactly the input shape.

Every model holds ``encoder`` (timm's contract: ``forward_features`` gives the map the
decoder reads, ``forward`` the flat bottleneck features (B, num_features) that k-means
clusters) and ``decoder``; ``forward(x)`` is the reconstruction. The encoders take images
in [0, 1], as the paper trains them, not the (x - 0.5) / 0.5 scale of the other backbones.

The paper's appendix listings are incomplete (the base CNN's decoder and the no-max-pool
model are cut off) and fit only 50x50 inputs (odd kernels 3, 5, 4, 3, 2 chosen so the
map shrinks 50 -> 1). Decisions, so that any input size works (32x32 crops, 50x50 IDC
patches, 64x64 chromosomes, 224x224 tiles):

- ``fc``: the appendix's model exactly: flatten, Linear+BN+ReLU 2000, 1000, 500, ``latent``
  (64), mirrored decoder, Linear to C*H*W, sigmoid. The bottleneck is the 64-d ReLU output.
- ``conv_pool`` (the "base CNN"): five 3x3 convolutions with the paper's channels
  C -> 128 -> 256 -> 512 -> 256 -> 256. Each of the first four is conv (stride 1) + BN +
  ReLU + 2x2 max-pool with ``ceil_mode``, so the side goes n -> ceil(n/2) four times
  (50 -> 25 -> 13 -> 7 -> 4, 32 -> 16 -> 8 -> 4 -> 2). The fifth convolution's kernel spans
  the whole remaining map (like the paper's last 2x2 conv on a 2x2 map), giving the
  paper's 256 x 1 x 1 bottleneck ("to reduce the dimension from 50 to 1"; "latent
  features of size 256"), followed by BN and no ReLU, as listed.
- ``conv`` (the paper's best, "max pooling layers removed"): the same channels, with
  each max-pool replaced by a stride of 2 in the convolution before it. Simply deleting
  the pools would leave a 256 x 45 x 45 map (518k features) at 50x50 and contradict
  "dimension reduced"; the authors' own code for this model
  (github.com/Bozhao-Liu/Kaggle-breast-cancer-autoencoder, CustomCNN) downsamples with
  stride-2 convolutions to a 1 x 1 bottleneck, which is what this does (one stride per
  max-pool it replaces).
- Conv decoders (the base CNN's is not listed): a ReLU on the bottleneck (as the authors'
  code does; the encoder ends at BN), then the mirror image in transposed
  convolutions: one whose kernel spans the bottleneck's target map (1 -> 4 at 50x50),
  then four 3x3 stride-2 transposed convolutions whose output padding is chosen from the
  encoder's sizes, so every stage lands on the size the encoder had there (4 -> 7 -> 13
  -> 25 -> 50): the output equals the input size exactly, with no crop or resize.
  BN+ReLU after each but the last, which is followed by a sigmoid.
- ``resnet``: a timm ResNet (resnet18 by default; the paper's hand-made ResNet AE did
  worst) with ``forward_features`` as the encoder map (512 x ceil(n/32)^2) and a decoder
  of five 3x3 stride-2 transposed convolutions mirroring its stages (512 -> 256 -> 128
  -> 64 -> 64 -> C), sized like the conv decoder. Features: the globally average-pooled
  map (512-d, the backbone's usual ``num_features``); flattening would give 25,088 at 224.
- ``norm=False`` drops every BatchNorm the module adds (convolutions then get biases); the
  timm ResNet keeps its own.
- The models are built for one input size (``data.size``): the fc layers, the bottleneck
  kernel and the output paddings depend on it; another size is refused with a clear error.

The fc, conv and conv_pool encoders are registered with timm as ``dcae_fc_encoder``,
``dcae_conv_encoder`` and ``dcae_conv_pool_encoder`` (``img_size``, ``in_chans`` and the
builder's arguments), so ``sslkit export`` writes them as timm checkpoints like any other
backbone; the resnet encoder already is timm's model. Their pretrained config says mean 0,
std 1: the inputs are [0, 1] images.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

CONV_WIDTHS = (128, 256, 512, 256, 256)  # the paper's channels; the last is the bottleneck


def halvings(size: int, times: int) -> list[int]:
    """[size, ceil(size/2), ...]: the side after each stride-2 step (conv k3 p1, ceil-mode pool)."""
    sides = [size]
    for _ in range(times):
        sides.append((sides[-1] + 1) // 2)
    return sides


def _norm2d(channels: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm else nn.Identity()


def _up(in_chs: int, out_chs: int, *, target: int, source: int) -> nn.ConvTranspose2d:
    """3x3 stride-2 transposed conv from side ``source`` to ``target`` (ceil(target/2) == source)."""
    assert (target + 1) // 2 == source, (target, source)
    # out = 2 * source - 1 + output_padding
    return nn.ConvTranspose2d(in_chs, out_chs, 3, stride=2, padding=1, output_padding=target - 2 * source + 1)


def _check_input(x: Tensor, in_chans: int, size: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans or x.shape[-2:] != (size, size):
        raise ValueError(f"The {name} autoencoder was built for ({in_chans}, {size}, {size}) images "
                         f"(data.channels, data.size); got {tuple(x.shape)}.")


class _Encoder(nn.Module):
    """Runs ``body`` (the decoder's input map), then pools or flattens it: (B, num_features).

    timm's model contract (``num_features``, ``forward_features``, ``forward_head``,
    ``reset_classifier``), so the fc and conv encoders are timm models too. The classifier is
    empty (``num_classes=0``) inside an autoencoder, which keeps its state dict unchanged.
    ``timm_name`` and ``timm_kwargs`` (besides ``in_chans``) are what ``timm.create_model``
    rebuilds it from (see ``timm_encoder``)."""

    def __init__(self, body: nn.Module, *, num_features: int, pool: bool, in_chans: int, size: int, name: str,
                 num_classes: int = 0, timm_name: str | None = None, timm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.body, self.num_features, self.pool = body, num_features, pool
        self.in_chans, self.size, self.name = in_chans, size, name
        self.timm_name, self.timm_kwargs = timm_name or f"dcae_{name}_encoder", dict(timm_kwargs or {})
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_chans, self.size, self.name)
        return self.body(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3)) if self.pool else x.flatten(1)  # (B, num_features)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class Autoencoder(nn.Module):
    """``encoder`` + ``decoder``; ``forward``: (B, C, H, W) in [0, 1] -> reconstruction, same shape."""

    def __init__(self, encoder: _Encoder, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    @property
    def num_features(self) -> int:
        return self.encoder.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder.forward_features(x))


def _fc_block(in_dim: int, out_dim: int, norm: bool) -> list[nn.Module]:
    return [nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim) if norm else nn.Identity(), nn.ReLU(inplace=True)]


def fc_encoder(*, in_chans: int, size: int, latent: int = 64, hidden: tuple[int, ...] = (2000, 1000, 500),
               norm: bool = True, num_classes: int = 0) -> _Encoder:
    """Flatten, then Linear+BN+ReLU through ``hidden`` to ``latent``: (B, C, H, W) -> (B, latent)."""
    dims = [in_chans * size * size, *hidden, latent]
    enc: list[nn.Module] = [nn.Flatten(1)]
    for a, b in zip(dims[:-1], dims[1:]):
        enc += _fc_block(a, b, norm)
    args = {"img_size": size, "latent": latent, "hidden": list(hidden), "norm": norm}
    return _Encoder(nn.Sequential(*enc), num_features=latent, pool=False, in_chans=in_chans, size=size, name="fc",
                    num_classes=num_classes, timm_kwargs=args)


def fc_autoencoder(*, in_chans: int, size: int, latent: int = 64, hidden: tuple[int, ...] = (2000, 1000, 500),
                   norm: bool = True) -> Autoencoder:
    """C*H*W -> hidden... -> latent -> reversed hidden -> C*H*W (7500-2000-1000-500-64 at 3x50x50)."""
    encoder = fc_encoder(in_chans=in_chans, size=size, latent=latent, hidden=hidden, norm=norm)
    back = [in_chans * size * size, *hidden, latent][::-1]
    dec: list[nn.Module] = []
    for a, b in zip(back[:-2], back[1:-1]):
        dec += _fc_block(a, b, norm)
    dec += [nn.Linear(back[-2], back[-1]), nn.Sigmoid(), nn.Unflatten(1, (in_chans, size, size))]
    return Autoencoder(encoder, nn.Sequential(*dec))


def conv_encoder(*, in_chans: int, size: int, pool: bool = False, widths: tuple[int, ...] = CONV_WIDTHS,
                 norm: bool = True, num_classes: int = 0) -> _Encoder:
    """Four downsampling 3x3 convs (stride 2, or stride 1 + max-pool when ``pool``) and a
    bottleneck conv spanning the remaining map: (B, C, H, W) -> (B, widths[-1], 1, 1)."""
    if len(widths) != 5:
        raise ValueError(f"conv autoencoder widths are five channel counts, got {widths}.")
    sides = halvings(size, 4)  # sides[i]: the map side after i downsamplings
    enc: list[nn.Module] = []
    chans = [in_chans, *widths]
    for i in range(4):
        stride = 1 if pool else 2
        enc += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=stride, padding=1, bias=not norm),
                _norm2d(chans[i + 1], norm), nn.ReLU(inplace=True)]
        if pool:
            enc.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
    enc += [nn.Conv2d(widths[3], widths[4], sides[4], bias=not norm), _norm2d(widths[4], norm)]
    args = {"img_size": size, "widths": list(widths), "norm": norm}
    return _Encoder(nn.Sequential(*enc), num_features=widths[4], pool=False, in_chans=in_chans, size=size,
                    name="conv_pool" if pool else "conv", num_classes=num_classes, timm_kwargs=args)


def conv_autoencoder(*, in_chans: int, size: int, pool: bool = False, widths: tuple[int, ...] = CONV_WIDTHS,
                     norm: bool = True) -> Autoencoder:
    """DCAE's conv AE: ``conv_encoder`` and a decoder of transposed convs back to (C, H, W)."""
    encoder = conv_encoder(in_chans=in_chans, size=size, pool=pool, widths=widths, norm=norm)
    sides = halvings(size, 4)
    chans = [in_chans, *widths]
    dec: list[nn.Module] = [nn.ReLU(inplace=False),
                            nn.ConvTranspose2d(widths[4], widths[3], sides[4], bias=not norm),
                            _norm2d(widths[3], norm), nn.ReLU(inplace=True)]
    outs = [widths[2], widths[1], widths[0], in_chans]
    for i, out_chs in enumerate(outs):  # side sides[4 - i] -> sides[3 - i]
        dec.append(_up(chans[4 - i], out_chs, target=sides[3 - i], source=sides[4 - i]))
        dec += [_norm2d(out_chs, norm), nn.ReLU(inplace=True)] if i < 3 else [nn.Sigmoid()]
    return Autoencoder(encoder, nn.Sequential(*dec))


class _TimmBody(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


def resnet_autoencoder(*, in_chans: int, size: int, backbone: str = "resnet18", norm: bool = True,
                       **timm_kwargs) -> Autoencoder:
    """timm ResNet encoder (five stride-2 steps, 32x) + five stride-2 transposed convs back.
    ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``channels`` of the four stages)."""
    model = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs)
    info = model.feature_info  # stages at reductions 2, 4, 8, 16, 32 for timm ResNets
    reductions = [f["reduction"] for f in info]
    if reductions != [2, 4, 8, 16, 32]:
        raise ValueError(f"The resnet autoencoder needs a timm ResNet with stages at reductions 2..32; "
                         f"'{backbone}' has {reductions}.")
    chans = [f["num_chs"] for f in info]  # e.g. [64, 64, 128, 256, 512]
    sides = halvings(size, 5)
    dec: list[nn.Module] = []
    outs = [*chans[-2::-1], in_chans]  # 256, 128, 64, 64, C
    ins = chans[::-1]  # 512, 256, 128, 64, 64
    for i, (a, b) in enumerate(zip(ins, outs)):  # side sides[5 - i] -> sides[4 - i]
        dec.append(_up(a, b, target=sides[4 - i], source=sides[5 - i]))
        dec += [_norm2d(b, norm), nn.ReLU(inplace=True)] if i < 4 else [nn.Sigmoid()]
    encoder = _Encoder(_TimmBody(model), num_features=model.num_features, pool=True, in_chans=in_chans,
                       size=size, name="resnet", timm_name=backbone, timm_kwargs=timm_kwargs)
    return Autoencoder(encoder, nn.Sequential(*dec))


def create_autoencoder(arch: str, *, in_chans: int, size: int, latent: int = 64, norm: bool = True,
                       **kwargs) -> Autoencoder:
    """``arch``: fc | conv | conv_pool | resnet (method.arch); kwargs: fc hidden, conv widths, resnet
    backbone and timm arguments."""
    if arch == "fc":
        return fc_autoencoder(in_chans=in_chans, size=size, latent=latent, norm=norm, **kwargs)
    if arch in ("conv", "conv_pool"):
        return conv_autoencoder(in_chans=in_chans, size=size, pool=arch == "conv_pool", norm=norm, **kwargs)
    if arch == "resnet":
        return resnet_autoencoder(in_chans=in_chans, size=size, norm=norm, **kwargs)
    raise ValueError(f"Unknown autoencoder '{arch}' (method.arch); choose fc, conv, conv_pool or resnet.")



def timm_encoder(net: Autoencoder) -> tuple[nn.Module, str, dict[str, Any]]:
    """The encoder as a timm model: (module, timm name, ``create_model`` kwargs besides ``in_chans``).

    The resnet encoder is the timm ResNet inside it (its pooled features are the encoder's);
    the others are the registered ``dcae_*_encoder`` models below."""
    encoder = net.encoder
    module = encoder.body.model if isinstance(encoder.body, _TimmBody) else encoder
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in encoder.timm_kwargs.items()}  # as JSON has them
    return module, encoder.timm_name, kwargs


# ------------------------------------------------------------------ timm registry


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # [0, 1] inputs (mean 0, std 1); the whole image resized to the one size the model takes.
    return {"url": "", "num_classes": 0, "input_size": (3, 32, 32), "fixed_input_size": True,
            "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "crop_pct": 1.0, "crop_mode": "squash",
            "interpolation": "bilinear", "classifier": "head", **kwargs}


# timm's registry reads this module-level table when the models below are registered.
default_cfgs = generate_default_cfgs({
    "dcae_fc_encoder.untrained": _cfg(first_conv=None),  # a Linear first: no input-conv adaptation
    "dcae_conv_encoder.untrained": _cfg(first_conv="body.0"),
    "dcae_conv_pool_encoder.untrained": _cfg(first_conv="body.0"),
})


def _side(img_size: int | tuple[int, ...] | list[int]) -> int:
    if isinstance(img_size, int):
        return img_size
    if len(img_size) != 2 or img_size[0] != img_size[1]:
        raise ValueError(f"The DCAE encoders take square images; got img_size={img_size}.")
    return int(img_size[0])


def _build_encoder(*, arch: str, img_size: int | tuple[int, int] = 32, in_chans: int = 3, num_classes: int = 0,
                   **kwargs: Any) -> _Encoder:
    """timm's entry: ``img_size`` (timm passes the pretrained config's (H, W) when not given)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if arch == "fc":
        return fc_encoder(in_chans=in_chans, size=_side(img_size), num_classes=num_classes, **kwargs)
    return conv_encoder(in_chans=in_chans, size=_side(img_size), pool=arch == "conv_pool", num_classes=num_classes,
                        **kwargs)


def _create(arch: str, pretrained: bool, **kwargs: Any) -> _Encoder:
    return build_model_with_cfg(partial(_build_encoder, arch=arch), f"dcae_{arch}_encoder", pretrained, **kwargs)


if "dcae_conv_encoder" not in timm.list_models("dcae_*"):

    @register_model
    def dcae_fc_encoder(pretrained: bool = False, **kwargs: Any) -> _Encoder:
        """DCAE's fully connected encoder (``latent``, ``hidden``, ``norm``) for [0, 1] images."""
        return _create("fc", pretrained, **kwargs)

    @register_model
    def dcae_conv_encoder(pretrained: bool = False, **kwargs: Any) -> _Encoder:
        """DCAE's conv encoder, stride-2 convolutions (``widths``, ``norm``) for [0, 1] images."""
        return _create("conv", pretrained, **kwargs)

    @register_model
    def dcae_conv_pool_encoder(pretrained: bool = False, **kwargs: Any) -> _Encoder:
        """DCAE's base CNN encoder, convolutions + max-pools (``widths``, ``norm``) for [0, 1] images."""
        return _create("conv_pool", pretrained, **kwargs)
