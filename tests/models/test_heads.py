"""DINO head and projection MLPs."""
import pytest
import torch
from torch import nn

from models.heads import MLP, DINOHead


def test_dino_head_matches_a_weight_norm_reference():
    torch.manual_seed(0)
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    last_layer_keys = [k for k in head.state_dict() if k.startswith("last_layer")]
    assert last_layer_keys == ["last_layer.weight_v", "last_layer.weight_g"]
    assert not head.last_layer.weight_g.requires_grad
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # test the general g, not just the frozen g = 1
    last = nn.utils.parametrizations.weight_norm(nn.Linear(16, 100, bias=False))
    last.parametrizations.weight.original0.data.copy_(head.last_layer.weight_g)
    last.parametrizations.weight.original1.data.copy_(head.last_layer.weight_v)
    x = torch.randn(5, 32)
    expected = last(nn.functional.normalize(head.mlp(x), dim=-1))
    torch.testing.assert_close(head(x), expected)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_dino_head_options():
    head = DINOHead(8, 10, use_bn=True, norm_last_layer=False, nlayers=2, hidden_dim=12, bottleneck_dim=4)
    assert head.last_layer.weight_g.requires_grad
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear"]
    assert head(torch.randn(2, 3, 8)).shape == (2, 3, 10)  # leading dims folded for BatchNorm
    single = DINOHead(8, 10, nlayers=1, bottleneck_dim=4)
    assert list(single.state_dict())[:2] == ["mlp.weight", "mlp.bias"]  # DINO's names for one layer
    unit = DINOHead(8, 10, hidden_dim=12, bottleneck_dim=4)
    rows = unit.last_layer.weight_v / unit.last_layer.weight_v.norm(dim=1, keepdim=True)
    logits = unit(torch.randn(3, 8))
    assert logits.abs().max() <= 1 + 1e-5  # unit prototypes and unit bottleneck: cosine logits
    assert rows.shape == (10, 4)


def test_mlp_layouts():
    assert isinstance(MLP(4, 3, num_layers=1).mlp[0], nn.Linear) and len(MLP(4, 3, num_layers=1).mlp) == 1
    crw = MLP(512, 128, hidden_dim=512, num_layers=2, act="relu")
    assert [type(m).__name__ for m in crw.mlp] == ["Linear", "ReLU", "Linear"]
    bn = MLP(6, 2, hidden_dim=5, num_layers=3, norm="bn")
    assert bn(torch.randn(2, 4, 6)).shape == (2, 4, 2)
    with pytest.raises(ValueError):
        MLP(4, 4, num_layers=0)
