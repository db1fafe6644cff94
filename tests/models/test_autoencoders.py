"""DCAE's autoencoders: exact output shapes, bottleneck sizes, and they learn to reconstruct."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslkit.models.autoencoders import create_autoencoder, halvings

# Tiny widths keep every case at a fraction of a second; the structure is the paper's.
TINY = {"fc": {"hidden": (64, 32, 16), "latent": 8}, "conv": {"widths": (8, 16, 16, 16, 8)},
        "conv_pool": {"widths": (8, 16, 16, 16, 8)}, "resnet": {"channels": (16, 16, 16, 16)}}
FEATURES = {"fc": 8, "conv": 8, "conv_pool": 8, "resnet": 16}
SHAPES = [(1, 32), (3, 32), (3, 50)]


def _tiny(arch: str, channels: int, size: int, norm: bool = True) -> nn.Module:
    kwargs = dict(TINY[arch])
    latent = kwargs.pop("latent", 64)
    return create_autoencoder(arch, in_chans=channels, size=size, latent=latent, norm=norm, **kwargs)


def test_halvings_match_stride_two_convolutions_and_ceil_mode_pools():
    x = torch.zeros(1, 1, 50, 50)
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
    sides_conv, sides_pool, a, b = [50], [50], x, x
    for _ in range(4):
        a, b = conv(a), pool(b)
        sides_conv.append(a.shape[-1])
        sides_pool.append(b.shape[-1])
    assert sides_conv == sides_pool == halvings(50, 4) == [50, 25, 13, 7, 4]


@pytest.mark.parametrize("arch", ["fc", "conv", "conv_pool", "resnet"])
@pytest.mark.parametrize("channels,size", SHAPES)
def test_reconstruction_has_exactly_the_input_shape(arch, channels, size):
    model = _tiny(arch, channels, size).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        recon, feats = model(x), model.encoder(x)
    assert recon.shape == x.shape
    assert 0.0 <= recon.min() and recon.max() <= 1.0  # sigmoid output, like the [0, 1] input
    assert feats.shape == (2, model.num_features) == (2, FEATURES[arch])
    assert model.encoder.num_features == FEATURES[arch]


def test_paper_sizes_fc_and_conv_bottlenecks():
    """At 3x50x50 the fc model is the appendix's 7500-2000-1000-500-64 and the conv
    models end at the paper's 256 x 1 x 1 bottleneck."""
    fc = create_autoencoder("fc", in_chans=3, size=50, latent=64)
    linears = [m for m in fc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (7500, 2000), (2000, 1000), (1000, 500), (500, 64), (64, 500), (500, 1000), (1000, 2000), (2000, 7500)]
    for arch in ("conv", "conv_pool"):
        model = create_autoencoder(arch, in_chans=3, size=50).eval()
        convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
        assert [m.out_channels for m in convs] == [128, 256, 512, 256, 256]
        assert model.encoder.forward_features(torch.rand(1, 3, 50, 50)).shape == (1, 256, 1, 1)
        pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
        assert len(pools) == (4 if arch == "conv_pool" else 0)


def test_wrong_input_size_is_one_clear_error():
    model = _tiny("conv", 3, 32)
    with pytest.raises(ValueError, match="built for"):
        model(torch.rand(1, 3, 50, 50))


def _smooth_batch(n: int, channels: int, size: int) -> torch.Tensor:
    """Images a small bottleneck can code: random 4x4 patterns upsampled bilinearly, in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, channels, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("arch", ["fc", "conv", "conv_pool", "resnet"])
def test_a_few_adam_steps_learn_to_reconstruct(arch):
    torch.manual_seed(0)
    model = _tiny(arch, 3, 32)
    x = _smooth_batch(8, 3, 32)
    # The best input-blind output is the per-pixel batch mean; its error is the batch variance.
    blind = F.mse_loss(x.mean(0, keepdim=True).expand_as(x), x).item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3 if arch == "resnet" else 1e-2)
    with torch.no_grad():
        first = F.mse_loss(model(x), x).item()
    for _ in range(40):
        loss = F.mse_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = F.mse_loss(model(x), x).item()
    assert final < 0.5 * first and final < blind, (first, final, blind)
