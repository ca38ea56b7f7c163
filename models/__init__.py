"""Backbones (ViT, CRW's ResNet), heads, slot attention and checkpoint import/export."""
from models import heads, io, selfpatch_head, slots  # noqa: F401  (public submodules: models.heads.DINOHead, ...)
from models.registry import MODELS, build

__all__ = ["MODELS", "build", "heads", "io", "selfpatch_head", "slots"]
