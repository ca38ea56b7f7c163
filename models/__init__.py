"""Backbones (ViT, CRW's ResNet), heads, slot attention and checkpoint import/export."""
from models import heads  # noqa: F401  (public submodule: models.heads.DINOHead, models.heads.MLP)
from models.registry import MODELS, build

__all__ = ["MODELS", "build", "heads"]
