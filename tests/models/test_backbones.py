import pytest
import timm
import torch

from sslkit.models import create_backbone


def test_preact_resnet18_is_a_timm_model_for_32px():
    m = timm.create_model("preact_resnet18", num_classes=0)
    assert m.num_features == 512
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 512)
    # 3x3 stride-1 stem and no max-pool: the last stage sees 4x4 for a 32x32 crop.
    assert m.forward_features(x).shape == (2, 512, 4, 4)
    m.reset_classifier(7)
    assert m(x).shape == (2, 7)


def test_width_and_channels_and_norm():
    m = create_backbone("preact_resnet18", in_chans=1, width=8, norm="group")
    assert m.num_features == 64
    assert m(torch.randn(3, 1, 32, 32)).shape == (3, 64)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())


def test_any_timm_backbone_by_name_and_clear_error():
    assert create_backbone("resnet18")(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    with pytest.raises(ValueError, match="Unknown backbone 'resnet_nonexistent'"):
        create_backbone("resnet_nonexistent")


def test_an_argument_the_backbone_does_not_take_names_the_key():
    from sslkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"'resnet18' does not take 'width' \(model.backbone_kwargs"):
        create_backbone("resnet18", width=16)
