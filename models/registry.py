"""Backbones by name: ``models.build("vit_small_patch16", attn="auto", drop_path=0.1)``.

ViTs: ``vit_{tiny,small,base}_patch{8,16}`` (DINO's layout) and DINOv2's ``vit_{small,base}_patch14_dinov2``
and ``vit_{small,base}_patch14_reg4_dinov2`` (timm's names; LayerScale, 0 or 4 registers, 518-px grid).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from models.vit import VIT_SIZES, vit, vit_dinov2


def _crw_resnet(builder: str) -> Callable[..., nn.Module]:
    """models.resnet's ``builder``, imported on first use: models.resnet imports torchvision, whose import
    pulls in torch._dynamo (~3 s per process) that no ViT run or evaluation needs."""

    def build_resnet(**kwargs) -> nn.Module:
        from models import resnet

        return getattr(resnet, builder)(**kwargs)

    return build_resnet


MODELS: dict[str, Callable[..., nn.Module]] = {name: _crw_resnet(name) for name in ("resnet18_crw", "resnet18_crw_w16")}
for _size in VIT_SIZES:
    for _patch in (8, 16):
        MODELS[f"vit_{_size}_patch{_patch}"] = functools.partial(vit, _size, _patch)
DINOV2_SIZES = ("small", "base")  # the sizes DINOv2 released with and without registers (L/g: not yet here)
for _size in DINOV2_SIZES:
    MODELS[f"vit_{_size}_patch14_dinov2"] = functools.partial(vit_dinov2, _size, 0)
    MODELS[f"vit_{_size}_patch14_reg4_dinov2"] = functools.partial(vit_dinov2, _size, 4)


def build(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name``; ``kwargs`` go to its constructor.

    The model remembers ``(name, kwargs)`` as ``build_spec`` so ``models.io.export_backbone`` can
    record how to rebuild it.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    model = MODELS[name](**kwargs)
    model.build_spec = (name, dict(kwargs))
    return model
