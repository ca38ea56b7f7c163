"""`ViewSpec` (what an objective asks for) and the torch renderer that turns decoded frames plus
drawn parameters (`pipeline.params`) into the batch tensors.

Every view is a resized crop of a box in frame pixels, so each family is one or two batched
crop-resize calls followed by flips and colour (`pipeline.color`):

* clip (TimeT, SMTC): one box per clip, shared by its T frames -> `clip` (B, T, 3, S, S); with
  `color_draws` K > 1, the same crop under K independent colour draws -> `clip` (B, K, T, 3, S, S)
  (SMTC augments its student and teacher branches separately).
* multicrop (DINO, DoRA, SelfPatch): G + L boxes per clip, each shared by the T frames, drawn inside
  an optional clip-level region (`size` set: DoRA's first crop) -> `global` (B, G, T, 3, Sg, Sg) and
  `local` (B, L, T, 3, Sl, Sl). With `per_frame_local_boxes` (DoRA) every frame of a local crop has
  its own box inside the region. With `min_overlap` > 0 (NeCo) every crop after the first overlaps
  each global crop drawn before it by more than that fraction of the region's area (twice that
  between global crops), and with `boxes` the batch also carries `boxes` (B, G + L, 4) float32, each
  view's box in frame pixels (x0, y0, x1, y1), and `flip` (B, G + L) bool, so an objective can map
  the views' overlaps onto their patch grids.
* grid (CRW): one box per clip resized to `size` (256), then a grid of `patch_size` windows at
  `patch_stride`, each with its own random-resized-crop jitter, flip and colour, drawn independently
  per frame and patch as in videowalk -> `patches` (B, T, N, 3, P, P).

Every batch also has `label` (B,) int64 (-1 when unlabelled) and `sample` (B,) int64, the
dataset-wide sample id (index into the shards in manifest order), for kNN memories and debugging.

The crop-resize is an antialiased (triangle-filter) bilinear resize of the box. On the GPU it is one
`roi_align` call per output size over all boxes of the batch (adaptive sampling averages
ceil(box / out) samples per output pixel, which is what antialiasing does); on the CPU it is torch's
uint8 channels-last antialiased `interpolate`, several times faster there than `roi_align`. Both
read the same integer boxes; they differ by rounding only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.color import apply_color

FAMILIES = ("clip", "multicrop", "grid")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """The views an objective needs; the pipeline builds them.

    family: "clip", "multicrop" or "grid" (see the module docstring).
    frames, stride: T frames at stride S (packed frames) from a random valid start; T = 1 is image mode.
    size: clip: output side (None: 224). grid: side of the resized clip crop the patches are cut from
        (None: 256). multicrop: side-less clip-level region the views are drawn from, drawn with
        `scale`/`ratio` (None: the whole frame; DoRA: 300 with scale (0.2, 1)).
    scale, ratio: area fraction and aspect range of the clip-level random-resized crop.
    flip: horizontal flip with p = 0.5 (per view; per patch for grid).
    global_*, local_*: multi-crop counts, output sides and area ranges (relative to the region).
    color: the family's colour recipe. clip / multicrop: DINO's (jitter `jitter` with p 0.8, grayscale
        p 0.2, blur; multicrop views alternate blur 1.0 / 0.1 + solarize 0.2 for the globals and use
        blur 0.5 for locals; clip uses blur 0.5). grid: per-patch jitter `jitter` (CRW's 'cj').
    jitter: brightness, contrast, saturation, hue strengths (None: (0.4, 0.4, 0.2, 0.1), grid
        (0.1, 0.1, 0.1, 0.0)).
    per_frame_color: draw colour parameters per frame (DoRA) instead of once per view.
    first_global_blur: multicrop: blur probability of the even-numbered global crops (DINO's recipe 1.0;
        DoRA's single global clip 0.1).
    per_frame_local_boxes: multicrop: draw every local crop's box independently per frame (DoRA's
        local crops), instead of one box shared by the clip's frames.
    color_draws: clip family: independent colour draws of the one crop (SMTC: 2, student and teacher).
    min_overlap: multicrop: least overlap of every crop with each earlier global crop, as a fraction of
        the region's area (doubled between global crops); crops are redrawn until they meet it (NeCo 0.01).
    boxes: multicrop: also return each view's box and flip flag (`boxes`, `flip`) in the batch.
    patch_size, patch_stride, patch_scale: CRW grid; N = ((size - P) // stride + 1) ** 2 patches.
    mean, std: normalisation applied last.
    """

    family: str = "clip"
    frames: int = 1
    stride: int = 1
    size: int | None = None
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    global_crops: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    color: bool = True
    jitter: tuple[float, float, float, float] | None = None
    per_frame_color: bool = False
    per_frame_local_boxes: bool = False
    first_global_blur: float = 1.0
    color_draws: int = 1
    min_overlap: float = 0.0
    boxes: bool = False
    patch_size: int = 64
    patch_stride: int = 32
    patch_scale: tuple[float, float] = (0.7, 0.9)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"ViewSpec.family={self.family!r}: choose one of {FAMILIES}")
        if self.frames < 1 or self.stride < 1:
            raise ValueError(f"ViewSpec frames={self.frames}, stride={self.stride}: both must be >= 1")
        if self.family == "multicrop" and self.global_crops < 1:
            raise ValueError("ViewSpec multicrop needs global_crops >= 1")
        if self.color_draws < 1 or (self.color_draws > 1 and (self.family != "clip" or not self.color)):
            raise ValueError(f"ViewSpec color_draws={self.color_draws}: must be >= 1, and > 1 only for the "
                             "clip family with color=True")
        if (self.min_overlap or self.boxes) and (self.family != "multicrop" or self.per_frame_local_boxes):
            raise ValueError("ViewSpec min_overlap / boxes: only for the multicrop family with one box per view")
        if not 0.0 <= self.min_overlap < 0.5:
            raise ValueError(f"ViewSpec min_overlap={self.min_overlap}: must be in [0, 0.5)")
        if self.family == "grid" and self.grid_side < 1:
            raise ValueError(f"ViewSpec grid: patch_size {self.patch_size} does not fit in size {self.out_size}")

    @property
    def out_size(self) -> int:
        """Side of the clip-level crop after resizing (clip and grid families)."""
        if self.size is not None:
            return self.size
        return 256 if self.family == "grid" else 224

    @property
    def grid_side(self) -> int:
        """Patches per row and column of the CRW grid."""
        return (self.out_size - self.patch_size) // self.patch_stride + 1

    @property
    def num_views(self) -> int:
        """Boxes per clip that are shared by its frames (clip: 1, multicrop: G + L, grid: 1)."""
        return self.global_crops + self.local_crops if self.family == "multicrop" else 1

    @property
    def color_views(self) -> int:
        """Colour draws per clip: one per view, times ``color_draws`` (clip family)."""
        return self.num_views * self.color_draws

    @property
    def jitter_strength(self) -> tuple[float, float, float, float]:
        if self.jitter is not None:
            return self.jitter
        return (0.1, 0.1, 0.1, 0.0) if self.family == "grid" else (0.4, 0.4, 0.2, 0.1)


def crop_resize(frames: torch.Tensor, boxes: torch.Tensor, frame_ids: torch.Tensor, size: int) -> torch.Tensor:
    """Resize box k of frames `frame_ids[k]` to `size` x `size`.

    frames: (F, 3, H, W), uint8 on the CPU (channels-last strides are fastest) or any dtype on CUDA.
    boxes: (K, 4) integer x0, y0, x1, y1 (end exclusive). frame_ids: (K, G) frames sharing each box.
    Returns (K, G, 3, size, size): uint8 on the CPU, float in [0, 255] on CUDA.
    """
    K, G = frame_ids.shape
    if frames.is_cuda:
        return roi_crop_resize(frames, boxes, frame_ids, size)
    out = torch.empty((K, G, 3, size, size), dtype=frames.dtype)
    for k, ((x0, y0, x1, y1), ids) in enumerate(zip(boxes.tolist(), frame_ids.tolist())):
        crop = frames[ids, :, y0:y1, x0:x1]
        out[k] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out


def roi_crop_resize(frames: torch.Tensor, boxes: torch.Tensor, frame_ids: torch.Tensor, size: int) -> torch.Tensor:
    """`crop_resize` as one `roi_align` call (the CUDA branch; runs on any device), float32 out.

    float32, never half: roi_align computes its sample coordinates and sums its samples in the
    input dtype, and half has a 0.5-1 px step above 512-1024 px and a 16-32 step above 16k
    (measured on a 1280x720 frame: up to 12 grey levels off the float32 result)."""
    from torchvision.ops import roi_align

    K, G = frame_ids.shape
    rois = torch.cat([frame_ids.reshape(-1, 1), boxes.repeat_interleave(G, dim=0)], dim=1)
    # one conversion straight to the contiguous NCHW layout roi_align reads (it copies otherwise)
    src = frames.to(torch.float32, memory_format=torch.contiguous_format)
    out = roi_align(src, rois.to(src.dtype), (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.reshape(K, G, 3, size, size)


def _flip(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Mirror the images whose flag is set; `flags` broadcasts against x's leading dims."""
    flags = flags.reshape(flags.shape + (1,) * (x.dim() - flags.dim()))
    return torch.where(flags, x.flip(-1), x)


def _finish(x: torch.Tensor, color: torch.Tensor, spec: ViewSpec, dtype: torch.dtype) -> torch.Tensor:
    """uint8/0..255 crops (..., 3, h, w) + per-image colour params (..., 7) -> normalised `dtype`."""
    lead = x.shape[:-3]
    images = x.reshape(-1, *x.shape[-3:]).float().div_(255.0)
    if spec.color:
        images = apply_color(images, color.reshape(-1, color.shape[-1]).to(images.device))
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std).to(dtype).reshape(*lead, *x.shape[-3:])


def render(frames: torch.Tensor, params: dict[str, torch.Tensor], spec: ViewSpec,
           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Decoded frames (B*T, H, W, 3) uint8, frame b*T + t = frame t of sample b, on the target device,
    and the batch's parameters (`pipeline.params.unpack`) -> the batch dict of `spec.family`."""
    T = spec.frames
    B = frames.shape[0] // T
    device = frames.device
    nchw = frames.permute(0, 3, 1, 2)                       # channels-last strides, no copy
    params = {k: v.to(device) for k, v in params.items()}
    clip_frames = torch.arange(B * T, device=device).view(B, 1, T)
    batch = {"label": params["meta"][:, 0].long(), "sample": params["meta"][:, 1].long()}
    if spec.family == "grid":
        side, P = spec.out_size, spec.patch_size
        resized = crop_resize(nchw, params["box"].reshape(B, 4).long(), clip_frames.view(B, T), side)
        resized = resized.reshape(B * T, 3, side, side)
        N = spec.grid_side ** 2
        patch_frames = torch.arange(B * T, device=device).repeat_interleave(N).view(-1, 1)
        patches = crop_resize(resized, params["patch_box"].reshape(-1, 4).long(), patch_frames, P)
        patches = _flip(patches.reshape(B, T, N, 3, P, P), params["patch_flip"].bool())
        batch["patches"] = _finish(patches, params["color"], spec, dtype)
        return batch
    V, K = spec.num_views, spec.color_draws
    frame_ids = clip_frames.expand(B, V, T).reshape(B * V, T)
    boxes = params["box"].long()                            # (B, V, 4)
    if spec.boxes:
        batch["boxes"] = params["box"].to(torch.float32)
        batch["flip"] = params["flip"].bool()
    color = params["color"].expand(B, V * K, T, -1) if params["color"].shape[2] == 1 else params["color"]
    groups = ([("clip", 0, 1, spec.out_size)] if spec.family == "clip" else
              [("global", 0, spec.global_crops, spec.global_size),
               ("local", spec.global_crops, spec.local_crops, spec.local_size)])
    for name, first, count, size in groups:
        if count == 0:
            continue
        views = slice(first, first + count)
        if name == "local" and spec.per_frame_local_boxes:   # one box per frame: T single-frame crops
            crops = crop_resize(nchw, params["local_box"].long().reshape(-1, 4),
                                frame_ids.view(B, V, T)[:, views].reshape(-1, 1), size)
        else:
            crops = crop_resize(nchw, boxes[:, views].reshape(-1, 4),
                                frame_ids.view(B, V, T)[:, views].reshape(-1, T), size)
        crops = _flip(crops.reshape(B, count, T, 3, size, size), params["flip"][:, views].bool())
        if name == "clip":  # one crop, K colourings (K = 1 unless color_draws)
            out = _finish(crops.expand(B, K, T, 3, size, size), color, spec, dtype)
            batch[name] = out[:, 0] if K == 1 else out
        else:
            batch[name] = _finish(crops, color[:, views], spec, dtype)
    return batch
