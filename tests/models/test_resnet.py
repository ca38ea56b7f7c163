"""CRW's ResNet-18: output stride 8, reflect padding, layer removal, torchvision weights."""
import pytest
import torch
import torchvision
from torch import nn

import models


def test_output_stride_8_and_channels():
    enc = models.build("resnet18_crw").eval()
    out = enc(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 512, 8, 12) and enc.out_channels == 512
    enc.remove_layers(["layer4"])
    assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 256, 8, 8) and enc.out_channels == 256
    assert not any(k.startswith("layer4") for k in enc.state_dict())


def test_padding_modes():
    enc = models.build("resnet18_crw")
    padded = [m for m in enc.modules() if isinstance(m, nn.Conv2d) and any(m.padding)]
    assert padded and all(m.padding_mode == "reflect" for m in padded)
    zeros = models.build("resnet18_crw", padding_mode="zeros")
    assert all(m.padding_mode == "zeros" for m in zeros.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="padding_mode"):
        models.build("resnet18_crw", padding_mode="circular")


def test_only_trailing_layers_can_be_removed():
    with pytest.raises(ValueError, match="trailing"):
        models.build("resnet18_crw", remove_layers=["layer3"])
    enc = models.build("resnet18_crw", remove_layers=["layer3", "layer4"])
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 128, 4, 4)


def test_torchvision_weights_load_and_match_before_the_stride_change():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    enc = models.build("resnet18_crw", padding_mode="zeros").eval()
    missing, unexpected = enc.load_state_dict(reference.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]
    x = torch.randn(1, 3, 64, 64)
    enc.remove_layers(["layer3", "layer4"])
    trunk = nn.Sequential(reference.conv1, reference.bn1, reference.relu, reference.maxpool,
                          reference.layer1, reference.layer2)
    torch.testing.assert_close(enc(x), trunk(x))


def test_quarter_width_encoder_and_its_export_round_trip(tmp_path):
    from models.io import export_backbone, infer_arch, load_backbone
    enc = models.build("resnet18_crw_w16").eval()
    assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 128, 8, 8) and enc.out_channels == 128
    assert sum(p.numel() for p in enc.parameters()) * 14 < sum(p.numel() for p in models.build("resnet18_crw").parameters())
    assert infer_arch(enc.state_dict()) == ("resnet18_crw", {"width": 16})
    path = export_backbone(enc, tmp_path / "new" / "folder" / "enc.safetensors")  # parents are made
    loaded = load_backbone(path)
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(loaded(x), enc(x))
