"""Semi-supervised label propagation: carry the first frame's mask through a video with frozen features.

For each target frame, every feature cell looks at the first frame and the previous n frames, keeps its
top-k most similar context cells (jointly over all context frames) inside a spatial neighbourhood, and
takes the softmax(similarity / temperature)-weighted sum of their soft labels. Predictions are kept soft
and fed back as context; argmax happens only at output.

Presets (eval/propagation_config.py) reproduce the published protocols (team docs evaluation.md
§2.2, §2.3, §2.7):

* ``dino`` (facebookresearch/dino eval_video_segmentation.py): frames resized with cv2 INTER_LINEAR to
  short side 480 and long side floored to a multiple of 64, normalised with the script's std (0.228 for
  red); first frame + 7 previous; top-5; square neighbourhood |di|,|dj| <= 12 on every context frame;
  temperature 0.1; first-frame labels PIL-NEAREST-resized (classes: the ids that survive); output upsampled
  x stride (bilinear), per-channel min-max normalised, argmax, PIL-NEAREST-resized to the original size.
* ``crw`` (ajabri/videowalk test.py): CNN encoders see the native frame (padded convolutions: a
  ceil(W/8) x ceil(H/8) grid); ViTs the frame bilinearly resized to the size floored to the stride; first
  frame + 20 previous, missing previous frames are copies of the first; top-10; circular neighbourhood
  (distance < 12) on all but the first frame; temperature 0.05; first-frame labels bilinear-resized to the
  grid; output bilinear-resized to the original size, argmax.
* ``smtc`` (shvdiwnkozbw/SMTC eval_prop.py): ``crw`` with SMTC's ViT-S/16 settings (top-7, radius 7,
  temperature 0.2); its frames are the normalised float frames bilinearly resized to the floored size.
* ``smtc_upsampled``: SMTC's setting B: the ViT's feature map bilinearly upsampled x2 before the L2
  normalisation (stride 16 -> 8, DINOv2's 14 -> 7), top-28, radius 35, temperature 0.2.

docs/design.md has each preset's steps next to the reference script's lines. Patch 14 (DINOv2): input
sizes are floored to multiples of the patch (``network_size``); the ``dino`` preset's long side is floored
to a multiple of 64 only when the patch divides 64, else of the patch.

Speed and memory: the context lives in a ring buffer (no re-stacking per frame), and the affinity is
computed tile by tile: a tile of query cells only meets the key window its neighbourhood can reach, so
the work per query is (tile + 2r)^2 cells per context frame instead of the whole frame (small tiles waste
less of it on cells outside every neighbourhood), all context frames go through one batched matmul into
a reused buffer, the neighbourhood is a precomputed additive mask, the top-k is cut down by row maxima
before torch.topk sees it, and the labels of the k winners are one index into a cell-major label bank.
Memory is one tile's scores plus one column band of keys, never the (context x N x N) affinity DINO's
script materialises.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval.davis_io import VOID_LABEL, Sequence, write_mask
from eval.features import normalise_frames
from eval.propagation_config import IMAGENET_MEAN, PropagationConfig


def network_size(height: int, width: int, cfg: PropagationConfig, stride: int,
                 pads: bool = False) -> tuple[int, int]:
    """Input size for the backbone: DINO's rule (short side to ``short_side``, long side floored to a
    multiple of ``size_multiple``), or with ``short_side=None`` the native size: kept as it is for a
    backbone that ``pads`` (a CNN's padded convolutions give ceil(size / stride) cells, videowalk's test.py
    feeds native 854x480 frames), else floored to a multiple of the stride (a ViT silently drops the
    remainder; SMTC's eval_prop resizes to the floored size). With ``short_side`` both sides are multiples
    of the stride: for patch 14 the short side is floored too (480 -> 476) and the long side is floored to
    a multiple of the stride where the stride does not divide ``size_multiple``."""
    if cfg.short_side is None:
        size = (height, width) if pads else (height // stride * stride, width // stride * stride)
    else:
        multiple = max(cfg.size_multiple, stride)
        if multiple % stride:
            multiple = stride
        long_side = int(cfg.short_side * max(height, width) / min(height, width)) // multiple * multiple
        short_side = cfg.short_side // stride * stride
        size = (long_side, short_side) if height > width else (short_side, long_side)
    if min(size) < stride:
        raise ValueError(f"frames of {width}x{height} are smaller than one {stride}-pixel feature cell")
    return size


def network_input(frames: torch.Tensor, size: tuple[int, int], cfg: PropagationConfig) -> torch.Tensor:
    """uint8 (B, H, W, 3) frames -> normalised float (B, 3, h, w) at the network ``size``, resized the way
    the preset's reference script does it (``cfg.resize``) and normalised with ``cfg.std``."""
    resized = tuple(frames.shape[1:3]) != tuple(size)
    if resized and cfg.resize == "cv2":
        # DINO's read_frame: cv2.resize (INTER_LINEAR, fixed-point on uint8, no antialiasing) of each frame
        frames = torch.from_numpy(np.stack([cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                                            for frame in frames.cpu().numpy()])).to(frames.device)
    elif resized and cfg.resize == "antialias":
        frames = antialiased_resize(frames, size)
    x = normalise_frames(frames, IMAGENET_MEAN, cfg.std)
    if tuple(x.shape[-2:]) != tuple(size):
        # "bilinear": SMTC's eval_prop interpolates the normalised float frames (no rounding, no antialiasing)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def antialiased_resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, h, w, 3), antialiased bilinear (no aliasing when shrinking a lot)."""
    x = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False,
                      antialias=True)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1)


def pil_nearest(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 ids resized to ``size`` (h, w) with PIL's NEAREST, as DINO's script resizes its
    first-frame labels and its output (PIL's fixed-point source positions differ from torch's
    "nearest-exact" where a position falls exactly on a pixel edge, e.g. output column 640 of 832 -> 854)."""
    return np.asarray(Image.fromarray(ids).resize((size[1], size[0]), Image.NEAREST))


def first_frame_labels(mask: np.ndarray, grid: tuple[int, int], mode: str, device="cpu") -> torch.Tensor:
    """(H, W) ids -> (C, h, w) one-hot at the feature grid (void counts as background).

    "nearest" (DINO's read_seg): the id image PIL-NEAREST-resized, C = its max id + 1 (an object too small
    to survive the resize gets no channel). "bilinear" (CRW's vos.py, cv2.resize of the float one-hot):
    the one-hot of the full mask, C = max id + 1, bilinearly resized (soft labels at object borders)."""
    ids = np.where(mask == VOID_LABEL, 0, mask).astype(np.uint8)
    if mode == "nearest":
        small = torch.from_numpy(pil_nearest(ids, grid).astype(np.int64)).to(device)
        return F.one_hot(small, int(small.max()) + 1).permute(2, 0, 1).float()
    full = torch.from_numpy(ids.astype(np.int64)).to(device)
    onehot = F.one_hot(full, int(full.max()) + 1).permute(2, 0, 1).float()[None]
    return F.interpolate(onehot, size=grid, mode="bilinear", align_corners=False)[0]


def _neighbourhood_reach(cfg: PropagationConfig) -> int:
    """Largest cell offset inside the neighbourhood."""
    if cfg.neighbourhood == "square":
        return int(math.floor(cfg.radius))
    return max(int(math.ceil(cfg.radius)) - 1, 0)


@dataclass
class _Tile:
    rows: slice             # query rows (the query columns are its band's)
    key_rows: slice         # key rows the neighbourhood reaches (the key columns are its band's)
    outside: torch.Tensor   # (Q, R*W) additive mask: 0 inside the query cell's neighbourhood, -inf outside
    cells: torch.Tensor     # (R*W,) grid position (row * w + col) of each key window cell


@dataclass
class _Band:
    cols: slice             # query columns
    key_cols: slice         # key columns every tile of the band reaches
    tiles: list[_Tile]


def plan_tiles(grid: tuple[int, int], cfg: PropagationConfig, device="cpu") -> list[_Band]:
    """Split the grid into column bands of query tiles with their key windows and neighbourhood masks
    (once per grid size)."""
    h, w = grid
    reach = _neighbourhood_reach(cfg)
    bands = []
    for j0 in range(0, w, cfg.tile):
        cols = slice(j0, min(j0 + cfg.tile, w))
        key_cols = slice(max(j0 - reach, 0), min(cols.stop + reach, w))
        tiles = []
        for i0 in range(0, h, cfg.tile):
            rows = slice(i0, min(i0 + cfg.tile, h))
            key_rows = slice(max(i0 - reach, 0), min(rows.stop + reach, h))
            qi, qj = torch.meshgrid(torch.arange(rows.start, rows.stop), torch.arange(cols.start, cols.stop),
                                    indexing="ij")
            ki, kj = torch.meshgrid(torch.arange(key_rows.start, key_rows.stop),
                                    torch.arange(key_cols.start, key_cols.stop), indexing="ij")
            di = qi.reshape(-1, 1) - ki.reshape(1, -1)
            dj = qj.reshape(-1, 1) - kj.reshape(1, -1)
            if cfg.neighbourhood == "square":
                inside = (di.abs() <= cfg.radius) & (dj.abs() <= cfg.radius)
            else:
                inside = (di ** 2 + dj ** 2) < cfg.radius ** 2
            outside = torch.zeros(inside.shape).masked_fill_(~inside, float("-inf"))
            tiles.append(_Tile(rows, key_rows, outside.to(device), (ki * w + kj).reshape(-1).to(device)))
        bands.append(_Band(cols, key_cols, tiles))
    return bands


def _top_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint top-k of (S, Q, R, W) scores over (S, R, W) per query -> (Q, k') values and their flat
    (S, R, W) positions, k' = min(k, S*R*W).

    torch.topk scans element by element, while a max over W is vectorised: the k largest scores lie in
    the k rows (of W cells) with the largest maxima (every score of any other row is at most the k-th of
    those maxima, which are k distinct scores), so only k*W scores per query reach torch.topk.
    """
    slots, queries, rows, width = scores.shape
    row_max = scores.amax(-1).permute(1, 0, 2).reshape(queries, slots * rows)
    _, best_rows = row_max.topk(min(k, slots * rows), dim=1)                                # (Q, k_rows)
    candidates = scores[best_rows // rows, torch.arange(queries, device=scores.device)[:, None], best_rows % rows]
    top, pick = candidates.reshape(queries, -1).topk(min(k, candidates[0].numel()), dim=1)
    return top, best_rows.gather(1, pick // width) * width + pick % width


class Propagator:
    """The context of one video and the per-frame propagation step.

    The context lives in one buffer: slot 0 holds the first frame, slots 1.. a ring of the previous n
    frames; the labels are kept cell-major, (slots * h * w, C), so the top-k's labels are one index.
    Keys restricted to the neighbourhood (the ring, and the first frame for DINO) are scored per column
    band: the band's key columns are copied once per frame, after which every tile's key window is a
    view, and all windowed slots go through one batched matmul. An unrestricted first frame (CRW) is
    searched over the whole grid on its own, and its top-k merged with the windowed top-k.
    """

    def __init__(self, first_features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig):
        dim, h, w = first_features.shape
        self.cfg = cfg
        self.num_classes = first_labels.shape[0]
        self.bands = plan_tiles((h, w), cfg, first_features.device)
        slots = 1 + cfg.context
        self.keys = first_features.new_empty((slots, dim, h, w))
        self.labels = first_labels.new_empty((slots, h, w, self.num_classes))
        # CRW front-pads the video with copies of the annotated frame
        filled = slice(None) if cfg.pad_with_first else slice(0, 1)
        self.keys[filled] = first_features
        self.labels[filled] = first_labels.permute(1, 2, 0)
        self.window_start = 0 if cfg.restrict_first else 1   # first slot searched in the neighbourhood only
        self.filled = cfg.context if cfg.pad_with_first else 0
        self.position = 0
        # Reused scratch (band keys, scores): fresh large allocations per tile cost page faults on CPU
        band_width = max(band.key_cols.stop - band.key_cols.start for band in self.bands)
        window = max(tile.outside.numel() for band in self.bands for tile in band.tiles)
        self.band_keys = first_features.new_empty(slots * dim * h * band_width)
        self.scores = first_features.new_empty(slots * window)

    @torch.inference_mode()
    def step(self, features: torch.Tensor) -> torch.Tensor:
        """Propagate to the next frame: (D, h, w) L2-normalised features -> (C, h, w) soft labels."""
        cfg = self.cfg
        dim, h, w = features.shape
        windowed = slice(self.window_start, 1 + self.filled)
        slots = windowed.stop - windowed.start
        labels = self.labels.view(-1, self.num_classes)
        out = features.new_empty((self.num_classes, h, w))
        for band in self.bands:
            band_width = band.key_cols.stop - band.key_cols.start
            keys = self.band_keys[:slots * dim * h * band_width].view(slots, dim, h, band_width)
            keys.copy_(self.keys[windowed, :, :, band.key_cols])
            queries = features[:, :, band.cols].permute(1, 2, 0).contiguous()              # (h, c, D)
            for tile in band.tiles:
                query = queries[tile.rows].view(-1, dim)                                   # (Q, D)
                top = index = None
                if slots:
                    window = keys[:, :, tile.key_rows].reshape(slots, dim, -1)              # (A, D, R*W), a view
                    scores = self.scores[:slots * tile.outside.numel()].view(slots, *tile.outside.shape)
                    torch.bmm(query.expand(slots, -1, -1), window, out=scores).add_(tile.outside)
                    top, index = _top_candidates(scores.view(slots, len(query), -1, band_width), cfg.topk)
                    block = window.shape[-1]
                    index = (index // block + windowed.start) * (h * w) + tile.cells[index % block]
                if not cfg.restrict_first:
                    first_scores = (query @ self.keys[0].view(dim, -1)).view(1, -1, h, w)
                    first_top, first_index = _top_candidates(first_scores, cfg.topk)
                    if top is None:
                        top, index = first_top, first_index
                    else:  # merge the two candidate lists: top-k of the union is top-k of the 2k candidates
                        top, pick = torch.cat([top, first_top], 1).topk(
                            min(cfg.topk, top.shape[1] + first_top.shape[1]), dim=1)
                        index = torch.cat([index, first_index], 1).gather(1, pick)
                weights = torch.softmax(top / cfg.temperature, dim=1)                            # (Q, k)
                soft = torch.einsum("qk,qkc->qc", weights, labels[index])
                out[:, tile.rows, band.cols] = soft.T.view(self.num_classes, tile.rows.stop - tile.rows.start, -1)
        if cfg.context:
            self.keys[1 + self.position] = features
            self.labels[1 + self.position] = out.permute(1, 2, 0)
            self.position = (self.position + 1) % cfg.context
            self.filled = min(self.filled + 1, cfg.context)
        return out


def soft_to_mask(soft: torch.Tensor, size: tuple[int, int], cfg: PropagationConfig, stride: int) -> np.ndarray:
    """(C, h, w) soft labels -> (H, W) uint8 ids at the original frame size."""
    if cfg.output == "crw":
        up = F.interpolate(soft[None], size=size, mode="bilinear", align_corners=False)[0]
        return up.max(0).indices.to(torch.uint8).cpu().numpy()
    up = F.interpolate(soft[None], scale_factor=stride, mode="bilinear", align_corners=False)[0]
    low = up.amin(dim=(1, 2), keepdim=True)
    high = up.amax(dim=(1, 2), keepdim=True)
    # DINO's norm_mask: min-max per channel, only for channels that are positive somewhere (in place:
    # the full-resolution map is the largest tensor of the step)
    positive = high > 0
    up.sub_(torch.where(positive, low, 0)).div_(torch.where(positive, (high - low).clamp_min(1e-12), 1))
    ids = up.max(0).indices  # (max over a leading dim is much faster than argmax on CPU)
    return pil_nearest(ids.to(torch.uint8).cpu().numpy(), size)


def propagate_video(features: Iterable[torch.Tensor], first_mask: np.ndarray, frame_size: tuple[int, int],
                    cfg: PropagationConfig, stride: int) -> Iterator[np.ndarray]:
    """Yield (H, W) uint8 masks for frames 1.. from an iterable of per-frame (D, h, w) features (frame 0
    first). Frame 0's output is its ground truth and is not yielded."""
    features = iter(features)
    first = next(features)
    labels = first_frame_labels(first_mask, tuple(first.shape[-2:]), cfg.label_resize, first.device)
    propagator = Propagator(first, labels, cfg)
    for frame_features in features:
        yield soft_to_mask(propagator.step(frame_features), frame_size, cfg, stride)


def sequence_frames(sequence: Sequence, net_size: tuple[int, int], batch: int,
                    device: torch.device) -> Iterator[torch.Tensor]:
    """The frames in order as uint8 (B, H, W, 3) batches of up to `batch` on `device`, resized to `net_size`
    (antialiased)."""
    for frames in _decoded_batches(sequence, batch, device):
        yield frames if tuple(frames.shape[1:3]) == net_size else antialiased_resize(frames, net_size)


def _decoded_batches(sequence: Sequence, batch: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, len(sequence.frames), batch):
        indices = range(start, min(start + batch, len(sequence.frames)))
        yield torch.stack([torch.from_numpy(sequence.frame(i)) for i in indices]).to(device)


def sequence_features(sequence: Sequence, features, net_size: tuple[int, int], batch: int,
                      device: torch.device, cfg: PropagationConfig) -> Iterator[torch.Tensor]:
    """Per-frame features, computed `batch` frames at a time: decode, :func:`network_input` (the preset's
    resize and normalisation), ``features`` (normalised frames -> maps, ``eval.features.dense_features``)."""
    for frames in _decoded_batches(sequence, batch, device):
        yield from features(network_input(frames, net_size, cfg))


def propagate_sequences(sequences: Iterable[Sequence], features, stride: int, cfg: PropagationConfig,
                        out_dir: str | Path, device: torch.device, batch: int = 8, pads: bool = False) -> dict:
    """Propagate every sequence and write palette PNGs in the DAVIS layout (frame 0 = its ground truth).

    ``features`` maps normalised frames to L2-normalised maps and must already upsample by ``cfg.upsample``
    (``dense_features(..., upsample=cfg.upsample)``), making cells of ``stride // cfg.upsample`` pixels;
    ``stride`` is the backbone's; ``pads``: its grid covers frames of any size (:func:`network_size`)."""
    out_dir = Path(out_dir)
    if stride % cfg.upsample:
        raise ValueError(f"upsample {cfg.upsample} does not divide the feature stride {stride}")
    cell = stride // cfg.upsample
    frames_done, started = 0, time.perf_counter()
    for sequence in sequences:
        first_stem = sequence.frame_stems[0]
        if first_stem not in sequence.masks:
            raise ValueError(f"sequence {sequence.name}: the first frame {first_stem} has no annotation")
        first_mask = sequence.mask(first_stem)
        net_size = network_size(*first_mask.shape, cfg, stride, pads)
        write_mask(out_dir / sequence.name / f"{first_stem}.png", first_mask)
        feats = sequence_features(sequence, features, net_size, batch, device, cfg)
        masks = propagate_video(feats, first_mask, first_mask.shape, cfg, cell)
        for stem, mask in zip(sequence.frame_stems[1:], masks):
            write_mask(out_dir / sequence.name / f"{stem}.png", mask)
        frames_done += len(sequence.frames)
    seconds = time.perf_counter() - started
    return {"frames": frames_done, "seconds": seconds, "frames_per_second": frames_done / max(seconds, 1e-9)}

