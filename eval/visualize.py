"""Pictures: propagated-mask overlays (PNG strip, GIF), PCA of patch features to RGB, attention maps per
head. Every function returns uint8 arrays (H, W, 3) so training can log them to TensorBoard with
``writer.add_image(tag, image, step, dataformats="HWC")``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval.davis_metrics import boundary_map
from eval.davis_io import voc_palette


def overlay(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend object colours (VOC palette, background untouched) over an RGB frame; object boundaries
    drawn opaque. frame (H, W, 3) uint8, mask (H, W) ids -> (H, W, 3) uint8."""
    if frame.shape[:2] != mask.shape:
        raise ValueError(f"frame {frame.shape[:2]} and mask {mask.shape} sizes differ")
    colours = voc_palette()[mask].astype(np.float32)
    out = frame.astype(np.float32)
    objects = mask > 0
    out[objects] = (1 - alpha) * out[objects] + alpha * colours[objects]
    edges = np.zeros_like(objects)
    for obj in np.unique(mask[objects]):
        edges |= boundary_map(mask == obj)
    out[edges] = colours[edges]
    return out.round().clip(0, 255).astype(np.uint8)


def overlay_strip(frames: Sequence[np.ndarray], masks: Sequence[np.ndarray], count: int = 6,
                  height: int = 160) -> np.ndarray:
    """`count` evenly spaced overlays side by side, each resized to `height` pixels high."""
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    tiles = []
    for i in picks:
        image = Image.fromarray(overlay(frames[i], masks[i]))
        width = max(1, round(image.width * height / image.height))
        tiles.append(np.asarray(image.resize((width, height), Image.BILINEAR)))
    return np.concatenate(tiles, axis=1)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def save_gif(path: str | Path, frames: Sequence[np.ndarray], masks: Sequence[np.ndarray], fps: float = 10.0
             ) -> Path:
    """Animated GIF of the overlays (Pillow), looping."""
    images = [Image.fromarray(overlay(f, m)) for f, m in zip(frames, masks)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def pca_rgb(features: torch.Tensor, size: tuple[int, int] | None = None) -> np.ndarray:
    """Patch features (D, h, w) or a stack (T, D, h, w) -> RGB of their first three principal components,
    min-max scaled per component over the whole stack (so colours are comparable across frames).
    Returns (h, w, 3), or (T, h, w, 3) for a stack, uint8; `size` resizes (nearest) to (H, W)."""
    single = features.dim() == 3
    stack = features[None] if single else features
    frames, dim, h, w = stack.shape
    x = stack.permute(0, 2, 3, 1).reshape(-1, dim).double()
    x = x - x.mean(0)
    _, vectors = torch.linalg.eigh(x.T @ x)
    projected = x @ vectors[:, -3:].flip(1)                      # first component -> red
    low, high = projected.amin(0), projected.amax(0)
    rgb = ((projected - low) / (high - low).clamp_min(1e-12)).reshape(frames, h, w, 3).float()
    if size is not None:
        rgb = F.interpolate(rgb.permute(0, 3, 1, 2), size=size, mode="nearest").permute(0, 2, 3, 1)
    out = (rgb * 255).round().byte().cpu().numpy()
    return out[0] if single else out


@torch.inference_mode()
def attention_maps(backbone, image: torch.Tensor) -> np.ndarray:
    """Last-block attention of the CLS token to every patch, per head: image (3, H, W) normalised ->
    (heads, h, w) uint8, each head min-max scaled. Needs a ViT with a class token."""
    out = backbone.forward_features(image[None], return_attention=True)
    if "cls" not in out:
        raise ValueError("attention maps need a ViT with a class token")
    h, w = out["grid"]
    attention = out["attention"][0, :, 0, -h * w:].reshape(-1, h, w).float()  # CLS row, patch columns
    low = attention.amin(dim=(1, 2), keepdim=True)
    high = attention.amax(dim=(1, 2), keepdim=True)
    return ((attention - low) / (high - low).clamp_min(1e-12) * 255).round().byte().cpu().numpy()


def attention_grid(maps: np.ndarray, scale: int = 8) -> np.ndarray:
    """(heads, h, w) uint8 maps -> one (h*scale, heads*w*scale, 3) image, heads side by side."""
    tiles = [np.kron(m, np.ones((scale, scale), np.uint8)) for m in maps]
    strip = np.concatenate(tiles, axis=1)
    return np.repeat(strip[..., None], 3, axis=2)
