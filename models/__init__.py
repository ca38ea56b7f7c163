"""Backbones (ViT, CRW's ResNet), heads, slot attention and checkpoint import/export."""
from models import heads, slots  # noqa: F401  (public submodules: models.heads.DINOHead, models.slots...)
from models.registry import MODELS, build

__all__ = ["MODELS", "build", "heads", "slots"]
