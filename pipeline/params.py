"""Every random choice of a sample, drawn in numpy from the sample's own generator.

Drawing in Python (not inside DALI or the renderer) is what makes the backends agree: the DALI
graph and the CPU fallback decode the same frames and render them with the same boxes, flips and
colour factors, and a resumed run redraws exactly what the uninterrupted one drew
(`pipeline.sampling.sample_rng`). The parameters of one sample travel as one flat float64 vector
(`pack`), so a DALI external-source worker can hand them to the renderer next to the encoded frames.

Layout: `meta` (5): label, sample id, start frame, samples skipped before this one, last skipped id
(-1); then the fields of the view family (`ViewSpec.layout`, drawn by `ViewSpec.draw` with this
module's box and colour functions), e.g. (V = views sharing a box across frames, Tc = T with per-frame
colour else 1):
  box (V, 4): x0, y0, x1, y1 in frame pixels (grid: the clip crop that is resized to `size`)
  flip (V,), color (V * K, Tc, 7)                   clip, multicrop (K = color_draws, 1 but for SMTC)
  local_box (L, T, 4): per-frame local boxes        multicrop with `per_frame_local_boxes` (`box`
                                                    then holds each local crop's frame-0 box)
  patch_box (T, N, 4) in resized-crop pixels, patch_flip (T, N), color (T, N, 7)   grid
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.color import NUM_COLOR_PARAMS
from pipeline.sampling import draw_start

if TYPE_CHECKING:  # pipeline.views draws with this module's functions
    from pipeline.views import ViewSpec

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back to a centre crop


def random_resized_boxes(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
                         ratio: tuple[float, float], n: int) -> np.ndarray:
    """n boxes (x0, y0, x1, y1) drawn like torchvision's `RandomResizedCrop.get_params`, vectorised."""
    area = width * height
    target = area * rng.uniform(scale[0], scale[1], (n, ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, ATTEMPTS)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    pick = fits.argmax(1)
    w, h = w[np.arange(n), pick], h[np.arange(n), pick]
    x0 = np.floor(rng.random(n) * (width - w + 1)).astype(np.int64)
    y0 = np.floor(rng.random(n) * (height - h + 1)).astype(np.int64)
    boxes = np.stack([x0, y0, x0 + w, y0 + h], 1)
    missed = ~fits.any(1)
    if missed.any():  # centre crop at the nearest allowed aspect ratio
        in_ratio = width / height
        cw, ch = ((width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else
                  (int(round(height * ratio[1])), height) if in_ratio > ratio[1] else (width, height))
        cx, cy = (width - cw) // 2, (height - ch) // 2
        boxes[missed] = (cx, cy, cx + cw, cy + ch)
    return boxes


def enforce_overlap(rng: np.random.Generator, boxes: np.ndarray, global_crops: int, width: int, height: int,
                    scales: tuple[tuple[float, float], tuple[float, float]], ratio: tuple[float, float],
                    min_overlap: float, attempts: int = 100) -> np.ndarray:
    """Redraw crops until each overlaps every global crop before it (NeCo's transform, in order).

    ``boxes`` (G + L, 4) in region pixels, globals first. Crop i > 0 must share more than
    ``int(min_overlap * width * height)`` pixels (twice that when it is a global crop) with each of the
    global crops 0 .. min(i, G) - 1; it is redrawn with its own scale (``scales``: global, local) until it
    does. NeCo redraws forever; after ``attempts`` this takes the first global crop's box, which meets
    the rule by construction (with tiny regions only).
    """
    need = int(width * height * min_overlap)
    boxes = boxes.copy()
    for i in range(1, len(boxes)):
        earlier = boxes[:min(i, global_crops)]
        threshold = need * 2 if i < global_crops else need
        scale = scales[0] if i < global_crops else scales[1]
        for _ in range(attempts):
            x0, y0 = np.maximum(earlier[:, 0], boxes[i, 0]), np.maximum(earlier[:, 1], boxes[i, 1])
            x1, y1 = np.minimum(earlier[:, 2], boxes[i, 2]), np.minimum(earlier[:, 3], boxes[i, 3])
            if np.all(np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None) > threshold):
                break
            boxes[i] = random_resized_boxes(rng, width, height, scale, ratio, 1)[0]
        else:
            boxes[i] = boxes[0]
    return boxes


def draw_color(rng: np.random.Generator, shape: tuple[int, ...], jitter: tuple[float, float, float, float],
               p_jitter: float, p_gray: float, p_blur: np.ndarray | float,
               p_solarize: np.ndarray | float) -> np.ndarray:
    """Colour parameters (`pipeline.color`) for images of `shape`; probabilities broadcast to it."""
    out = np.empty(shape + (NUM_COLOR_PARAMS,))
    on = rng.random(shape) < p_jitter
    for i, strength in enumerate(jitter[:3]):
        out[..., i] = np.where(on, rng.uniform(max(0.0, 1 - strength), 1 + strength, shape), 1.0)
    out[..., 3] = np.where(on, rng.uniform(-jitter[3], jitter[3], shape), 0.0)
    out[..., 4] = rng.random(shape) < p_gray
    out[..., 5] = np.where(rng.random(shape) < p_blur, rng.uniform(0.1, 2.0, shape), 0.0)
    out[..., 6] = rng.random(shape) < p_solarize
    return out


def layout(spec: ViewSpec) -> dict[str, tuple[int, ...]]:
    """Name -> per-sample shape of every packed field, in packing order."""
    return {"meta": (5,), **spec.layout()}


def packed_size(spec: ViewSpec) -> int:
    return sum(math.prod(shape) for shape in layout(spec).values())


def draw(spec: ViewSpec, rng: np.random.Generator, width: int, height: int, nframes: int,
         label: int, sample_id: int) -> dict[str, np.ndarray]:
    """All parameters of one sample (the `layout` fields) for a frame of width x height: the start
    frame, then the views' own (`spec.draw`)."""
    start = draw_start(rng, nframes, spec.frames, spec.stride)
    return {"meta": np.array([label, sample_id, start, 0, -1], dtype=np.float64),
            **spec.draw(rng, width, height)}


def pack(spec: ViewSpec, params: dict[str, np.ndarray]) -> np.ndarray:
    """The `layout` fields of one sample as one float64 vector."""
    return np.concatenate([np.asarray(params[name], dtype=np.float64).reshape(-1) for name in layout(spec)])


def unpack(spec: ViewSpec, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, packed_size) packed samples -> name -> (B, *shape) tensors (views of `rows`)."""
    out, at = {}, 0
    for name, shape in layout(spec).items():
        size = math.prod(shape)
        out[name] = rows[:, at:at + size].reshape(rows.shape[0], *shape)
        at += size
    return out
