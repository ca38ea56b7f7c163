"""CRW's frame encoder: a ResNet-18 with output stride 8 (objectives.md §1.b), at any width.

Changes from torchvision's ResNet-18: every convolution in layer3 and layer4 has stride 1, so the
feature map is H/8 x W/8; padded convolutions can pad by reflection (CRW's ``scratch`` default —
zero padding needs a lower walk temperature); the classifier is gone; and layers can be removed
for testing (CRW trains with layer4, C = 512, and evaluates on layer3, C = 256). Parameter names
are torchvision's, so torchvision and videowalk ResNet-18 state dicts load as they are.

``width`` scales every stage (64 is ResNet-18; ``resnet18_crw_w16`` is a quarter of it, 1/16 of the
FLOPs): the size that learns within the CPU budget of the learning benchmark (docs/learning.md).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

STAGES = ("layer1", "layer2", "layer3", "layer4")
STAGE_WIDTH = {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}  # channels per stage / base width


class CRWResNet(ResNet):
    """ResNet-18 trunk, output stride 8: ``enc(x)`` maps (B, 3, H, W) to (B, C, H/8, W/8).

    Args:
        padding_mode: ``"reflect"`` (CRW ``scratch``) or ``"zeros"`` (CRW ``scratch_zeropad``).
        remove_layers: trailing stages to drop, e.g. ``("layer4",)`` for CRW's test-time features.
        width: channels of the stem and layer1 (64: ResNet-18); later stages double it.
    """

    def __init__(self, padding_mode: str = "reflect", remove_layers: Sequence[str] = (), width: int = 64):
        super().__init__(BasicBlock, [2, 2, 2, 2])
        del self.fc, self.avgpool
        self.width = width
        if width != 64:  # torchvision's BasicBlock ResNet is 64 wide: rebuild the trunk at this width
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = self._norm_layer(width)
            for name, scale in STAGE_WIDTH.items():
                setattr(self, name, self._make_layer(BasicBlock, width * scale, 2, stride=1 if scale == 1 else 2))
            for module in self.modules():  # torchvision's initialisation
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        for stage in (self.layer3, self.layer4):
            for module in stage.modules():
                if isinstance(module, nn.Conv2d):
                    module.stride = (1, 1)
        if padding_mode not in ("reflect", "zeros"):
            raise ValueError(f"padding_mode must be 'reflect' or 'zeros', not {padding_mode!r}")
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and any(module.padding):
                module.padding_mode = padding_mode
        self.stages = list(STAGES)
        self.remove_layers(remove_layers)

    @property
    def out_channels(self) -> int:
        return self.width * STAGE_WIDTH[self.stages[-1]]

    @property
    def removed_modules(self) -> list[str]:
        """Stages dropped for testing: their checkpoint weights are expected and skipped on load."""
        return [name for name in STAGES if name not in self.stages]

    def remove_layers(self, names: Sequence[str]) -> None:
        """Drop trailing stages (in place); dropping a middle stage alone is refused."""
        for name in names:
            if name not in STAGES:
                raise ValueError(f"cannot remove {name!r}; removable stages are {STAGES}")
        kept = [s for s in self.stages if s not in names]
        if not kept or kept != self.stages[:len(kept)]:
            raise ValueError(f"removing {list(names)} would leave {kept}: only trailing stages can go")
        for name in set(self.stages) - set(kept):
            delattr(self, name)
        self.stages = kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return x


def resnet18_crw(**kwargs) -> CRWResNet:
    """CRW's encoder; ``kwargs`` go to :class:`CRWResNet`."""
    return CRWResNet(**kwargs)


def resnet18_crw_w16(**kwargs) -> CRWResNet:
    """CRW's encoder at a quarter of the width (16-128 channels; layer3: 64): CPU-budget runs."""
    return CRWResNet(width=16, **kwargs)
