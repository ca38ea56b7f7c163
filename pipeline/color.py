"""Photometric augmentation of a batch of images, vectorised over per-image parameters.

Parameters per image (the last axis of `pipeline.params` colour arrays), in application order:
brightness factor, contrast factor, saturation factor, hue shift (fraction of a turn), grayscale
flag, blur sigma (0: no blur), solarize flag. A skipped jitter is stored as (1, 1, 1, 0).

Each op computes what torchvision's functional op of the same name computes (tested), for every
image of a batch at once with its own factor, on the CPU and the GPU. One deliberate difference
from `ColorJitter` (DINO's recipe): the four jitter ops always run in the order above, where
torchvision permutes them per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_COLOR_PARAMS = 7
IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
BLUR_RADIUS = 6                       # 3 sigma at the largest sigma DINO draws (2.0)
_LUMA = (0.2989, 0.587, 0.114)        # torchvision's rgb_to_grayscale weights


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma (a sum of channel slices: 3x faster than a reduction)."""
    r, g, b = _LUMA
    return x[:, 0:1] * r + x[:, 1:2] * g + x[:, 2:3] * b


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of image n of (N, 3, H, W) by shift[n] turns (torchvision's `adjust_hue`)."""
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    chroma = value - x.min(1)[0]
    flat = chroma == 0
    sat = chroma / torch.where(flat, torch.ones_like(value), value)
    safe = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (value - r) / safe, (value - g) / safe, (value - b) / safe
    red_max, green_max = value == r, (value == g) & (value != r)
    hue = torch.where(red_max, bc - gc, torch.where(green_max, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = (hue / 6.0 + 1.0 + shift.view(-1, 1, 1)) % 1.0
    # back to RGB: each channel is the sector-wise piecewise-linear function of hue
    sector = hue * 6.0
    k = torch.stack([(5.0 + sector) % 6.0, (3.0 + sector) % 6.0, (1.0 + sector) % 6.0], 1)
    ramp = torch.minimum(k, 4.0 - k).clamp(0, 1)
    return value.unsqueeze(1) * (1 - sat.unsqueeze(1) * ramp)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur image n of (N, C, H, W) with its own sigma (all > 0), separable, reflect padding."""
    N, C, H, W = x.shape
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, dim=0)   # (N*C, taps)
    flat = x.reshape(1, N * C, H, W)
    flat = F.conv2d(F.pad(flat, (0, 0, BLUR_RADIUS, BLUR_RADIUS), mode="reflect"),
                    kernel.view(N * C, 1, -1, 1), groups=N * C)
    flat = F.conv2d(F.pad(flat, (BLUR_RADIUS, BLUR_RADIUS, 0, 0), mode="reflect"),
                    kernel.view(N * C, 1, 1, -1), groups=N * C)
    return flat.view(N, C, H, W)


def to_grayscale(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return grayscale(x).expand_as(x)


def solarize(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0.5, 1 - x, x)


# (parameter column, op(images, values)) applied only to the images whose value is non-zero
OPTIONAL_OPS = ((3, shift_hue), (4, to_grayscale), (5, gaussian_blur), (6, solarize))


def apply_color(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] and params (N, 7) -> augmented images in [0, 1] (a new tensor).

    Brightness, contrast and saturation run on every image (a skipped jitter has factor 1); hue,
    grayscale, blur and solarize only on the images whose parameter asks for them."""
    p = params.to(x.dtype).view(-1, NUM_COLOR_PARAMS, 1, 1, 1)
    bright, contrast, sat = p[:, 0], p[:, 1], p[:, 2]
    x = (x * bright).clamp_(0, 1)
    mean = grayscale(x).mean(dim=(2, 3), keepdim=True)
    x.mul_(contrast).add_((1 - contrast) * mean).clamp_(0, 1)
    gray = grayscale(x)
    x.mul_(sat).add_((1 - sat) * gray).clamp_(0, 1)
    for column, op in OPTIONAL_OPS:
        chosen = (params[:, column] != 0).nonzero().squeeze(1)
        if len(chosen):
            x[chosen] = op(x[chosen], params[chosen, column].to(x.dtype))
    return x
