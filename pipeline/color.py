"""Photometric augmentation of a batch of images, vectorised over per-image parameters.

Parameters per image (the last axis of `pipeline.params` colour arrays), in application order:
brightness factor, contrast factor, saturation factor, hue shift (fraction of a turn), grayscale
flag, blur sigma (0: no blur), solarize flag. A skipped jitter is stored as (1, 1, 1, 0).

Deliberate differences from torchvision's `ColorJitter` (DINO's recipe), chosen so one set of
tensor ops serves every image of a batch at once on the CPU and the GPU:
* the four jitter ops always run in the order above (torchvision permutes them per image);
* hue is a rotation of the chroma plane in YIQ space (a 3x3 matrix per image, the way DALI's
  `color_twist` does it) instead of an HSV round trip; the two agree closely for small shifts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NUM_COLOR_PARAMS = 7
IDENTITY = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
BLUR_RADIUS = 6                       # 3 sigma at the largest sigma DINO draws (2.0)
_LUMA = (0.299, 0.587, 0.114)         # ITU-R 601, as torchvision's rgb_to_grayscale
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """(N,) hue shifts in turns -> (N, 3, 3) RGB matrices rotating chroma in YIQ space."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, device=shift.device, dtype=torch.float32)
    from_yiq = torch.linalg.inv(to_yiq)
    angle = shift.float() * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(shift.shape[0], 3, 3, device=shift.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return from_yiq @ rot @ to_yiq


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


def apply_color(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] and params (N, 7) -> augmented images in [0, 1]."""
    p = params.to(x.dtype)
    bright, contrast, sat, hue, gray, sigma, solar = (p[:, i].view(-1, 1, 1, 1) for i in range(NUM_COLOR_PARAMS))
    x = (x * bright).clamp_(0, 1)
    mean = grayscale(x).mean(dim=(2, 3), keepdim=True)
    x = (contrast * x + (1 - contrast) * mean).clamp_(0, 1)
    x = (sat * x + (1 - sat) * grayscale(x)).clamp_(0, 1)
    shifted = params[:, 3] != 0
    if shifted.any():
        rotated = torch.einsum("nij,njhw->nihw", hue_matrices(params[shifted, 3]).to(x.dtype), x[shifted])
        x[shifted] = rotated.clamp_(0, 1)
    x = torch.where(gray > 0, grayscale(x).expand_as(x), x)
    blurred = params[:, 5] > 0
    if blurred.any():
        x[blurred] = gaussian_blur(x[blurred], params[blurred, 5])
    return torch.where((solar > 0) & (x >= 0.5), 1 - x, x)
