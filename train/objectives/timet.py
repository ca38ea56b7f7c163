"""TimeT: self-supervised time-tuning of dense image features (Salehi et al., "Time Does Tell", ICCV 2023).

An image-pretrained ViT (DINO, via ``--model.init``) is fine-tuned on clips of T frames:

1. the first frame's patches are assigned to K prototypes by a Sinkhorn balanced over the whole batch
   (the teacher's view of the frame);
2. the feature forwarder, a training-free label propagation along the backbone's own patch
   affinities (each frame from the first one and the previous ones, top-k inside a square window),
   carries those soft cluster maps to the last frame;
3. the student's prototype scores on the last frame learn the propagated hard labels (cross-entropy).

Each step runs the minimum of ViT passes: the student once over every frame (with gradients on the
last frame only, whose features also feed the forwarder) and the teacher once over the first frame.
The reference runs about eight passes over all frames (objectives spec T12).

Defaults follow the paper: a standard EMA teacher (``timet.teacher inverted`` reproduces the released
code's inverted update, T1), the forwarder and Sinkhorn settings the code really executes (T2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import models
from pipeline import ClipViews
from train.objectives.base import Objective
from train.optim import cosine_schedule
from train.queue import FeatureQueue
from train.sinkhorn import sinkhorn_balanced
from train.teacher import EMATeacher


def window_mask(grid: tuple[int, int], radius: int, device: torch.device | None = None) -> torch.Tensor:
    """(h*w, h*w) bool: cell n sees cell m when both their row and column differ by at most ``radius``."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)


def feature_forwarder(features: torch.Tensor, source_labels: torch.Tensor, grid: tuple[int, int], *,
                      context: int, radius: int, topk: int, temperature: float) -> torch.Tensor:
    """Propagate the first frame's soft labels through a clip, all clips of the batch at once.

    Args:
        features: (B, T, N, C) patch features of the T frames, N = h*w in row-major order.
        source_labels: (B, N, K) soft labels of frame 0.
        grid: (h, w).
        context: frames before the target, besides frame 0, that it reads labels from (TimeT 7).
        radius: half-side of the square window a target cell reads from (TimeT 6).
        topk: source cells kept per target cell, over all context frames jointly (TimeT 5).
        temperature: affinity exp(cosine / temperature) (TimeT 0.1).

    Returns:
        (B, T - 1, N, K) labels of frames 1..T-1. Frame t reads frame 0 and frames
        max(1, t - context)..t-1, each with the labels propagated to it before. The weights of a target
        cell are its affinities to the context cells in the window, every value below its k-th largest
        set to 0 (ties at the k-th value are all kept, as in the reference), normalised to sum 1.
    """
    batch, frames, cells, _ = features.shape
    if topk > cells:
        raise ValueError(f"feature forwarder: top-{topk} of a {grid[0]}x{grid[1]} patch grid ({cells} cells); "
                         "lower timet.ff_topk or raise timet.size")
    dtype = torch.promote_types(features.dtype, torch.float32)
    unit = F.normalize(features.to(dtype), dim=-1)
    outside = ~window_mask(grid, radius, features.device)
    labels = [source_labels.to(dtype)]
    for t in range(1, frames):
        sources = [0, *range(max(1, t - context), t)]
        # (B, N target, n_ctx, M source): exp(cos / tau) inside the window, 0 outside
        affinity = torch.exp(torch.einsum("bnc,bjmc->bnjm", unit[:, t], unit[:, sources]) / temperature)
        affinity = affinity.masked_fill(outside[None, :, None, :], 0.0).flatten(2)
        kth = affinity.topk(topk, dim=-1).values[..., -1:]
        weights = affinity.masked_fill(affinity < kth, 0.0)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        labels.append(torch.einsum("bnx,bxk->bnk", weights, torch.cat([labels[j] for j in sources], dim=1)))
    return torch.stack(labels[1:], dim=1)


def timet_loss(scores: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of prototype scores against hard labels.

    Args:
        scores: (B, N, K) cosines of the last frame's projected patches to the prototypes.
        labels: (B, N) int64 pseudo-labels (argmax of the propagated maps).
        temperature: softmax temperature of the scores (TimeT 0.1).
    """
    logits = scores.to(torch.promote_types(scores.dtype, torch.float32)) / temperature
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


class PrototypeHead(nn.Module):
    """TimeT's projection MLP (Linear-GELU between layers, default PyTorch init) and K prototypes.

    ``scores`` are cosines between projected patches and the prototypes; the prototypes are kept at
    unit norm by :meth:`normalize_prototypes` after every step (not inside the forward pass, as in
    the reference, so their gradient is that of the raw parameter).
    """

    def __init__(self, in_dim: int, dims: tuple[int, ...], num_prototypes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip((in_dim, *dims[:-1]), dims)):
            if index:
                layers.append(nn.GELU())
            layers.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, dims[-1]), dim=-1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) patch tokens -> (..., out_dim) projections."""
        return self.mlp(tokens)

    def scores(self, projected: torch.Tensor) -> torch.Tensor:
        """(..., out_dim) projections -> (..., K) cosines to the prototypes (float32 at least)."""
        projected = projected.to(torch.promote_types(projected.dtype, torch.float32))
        return F.normalize(projected, dim=-1) @ self.prototypes.to(projected.dtype).T

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.copy_(F.normalize(self.prototypes, dim=-1))


@dataclass
class TimeTConfig:
    """Knobs of TimeT (defaults: the paper and the values SMSD75/Timetuning time_tuning.py executes)."""

    num_prototypes: int = 200
    """Prototypes K of the first-frame clustering."""
    head_dims: tuple[int, ...] = (1024, 1024, 512, 256)
    """Widths of the projection MLP's layers after the backbone; the last is the prototype space."""
    temperature: float = 0.1
    """Softmax temperature of the last frame's prototype scores in the cross-entropy."""
    sinkhorn_epsilon: float = 0.05
    """Entropic temperature of the first-frame Sinkhorn."""
    sinkhorn_iterations: int = 10
    """Sinkhorn normalisation rounds: 10 is what the code runs (its --sinkhorn_iterations 3 is ignored, T2)."""
    ff_context: int = 7
    """Feature forwarder: previous frames read besides frame 0 (code 7; its --n_last_frames 6 is ignored, T2)."""
    ff_window: int = 6
    """Feature forwarder: half-side of the square window, in patches (13 x 13 cells on the 14 x 14 grid)."""
    ff_topk: int = 5
    """Feature forwarder: source cells kept per target cell, over all context frames jointly."""
    ff_temperature: float = 0.1
    """Feature forwarder: affinities are exp(cosine / this)."""
    teacher: Literal["ema", "inverted", "none"] = "ema"
    """Source of the first-frame targets. ema: an EMA teacher (paper; the code's evaluation copies);
    inverted: the released training code's update, teacher <- (1 - m) teacher + m student, so the teacher
    is 99.5 percent the current student (T1); none: the student itself, without gradient (the README)."""
    momentum_teacher: float = 0.995
    """Teacher momentum m at step 0; cosine to 1 at the end."""
    queue_size: int = 0
    """Rows of past teacher first-frame projections added to the Sinkhorn once the queue is full
    (code: 16384 with --use_queue, off by default). 0: no queue."""
    queue_rows_per_clip: int = 10
    """Random rows of each clip's first frame pushed into the queue per step (the code: 10 x batch)."""
    clip_len: int = 4
    """Frames per clip T (the last one is supervised)."""
    frame_stride: int = 30
    """Gap between the clip's frames in packed frames: 1 s at the packer's 30 fps, the mean gap of the
    code's 4 random sorted frames on a ~5 s YouTube-VOS video (the pipeline samples a regular stride)."""
    size: int = 224
    """Side of the clip crop."""
    crop_scale: tuple[float, float] = (0.4, 1.0)
    """Area range of the clip's random-resized crop (shared by its frames)."""
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    """Colour-jitter strengths (brightness, contrast, saturation, hue), applied with p 0.8 per clip."""


class TimeT(Objective):
    """Student ViT + projection + prototypes, trained on propagated first-frame clusters."""

    Config = TimeTConfig
    default_arch = "vit_small_patch16"

    def __init__(self, cfg: TimeTConfig, arch: str, drop_path: float = 0.0, *,
                 total_steps: int, steps_per_epoch: int) -> None:
        super().__init__()
        if cfg.clip_len < 2:
            raise ValueError(f"timet.clip_len={cfg.clip_len}: a clip needs a first and a last frame (>= 2)")
        self.cfg, self.total_steps = cfg, total_steps
        self.student = models.build(arch, drop_path=drop_path)
        self.student_head = PrototypeHead(self.student.embed_dim, cfg.head_dims, cfg.num_prototypes)
        if cfg.teacher != "none":
            self.teacher = EMATeacher(self.student, twin=models.build(arch, drop_path=0.0))
            self.teacher_head = EMATeacher(self.student_head)
        self.queue = FeatureQueue(cfg.queue_size, cfg.head_dims[-1]) if cfg.queue_size else None

    def views(self) -> ClipViews:
        c = self.cfg
        return ClipViews(frames=c.clip_len, stride=c.frame_stride, size=c.size, scale=c.crop_scale,
                        flip=True, color=True, jitter=c.jitter)

    def momentum(self, step: int) -> float:
        return cosine_schedule(step, self.cfg.momentum_teacher, 1.0, self.total_steps)

    def begin_step(self, step: int) -> dict[str, float]:
        return {"momentum": self.momentum(step)} if self.cfg.teacher != "none" else {}

    @torch.no_grad()
    def source_assignment(self, first_frames: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        """(B, N, K) balanced soft assignments of the first frames' patches to the prototypes.

        ``first_frames`` (B, 3, H, W) go through the teacher; without one, the student's backbone
        features of those frames ``student_features`` (B, N, C) are projected instead.
        """
        if self.cfg.teacher == "none":
            head, projected = self.student_head, self.student_head(student_features)
        else:
            head = self.teacher_head.net
            projected = head(self.teacher.net.forward_features(first_frames)["patches"])
        rows = projected.flatten(0, 1)
        scores = head.scores(rows)
        if self.queue is not None:  # as the reference: push first, then use the queue once it is full
            per_clip = min(self.cfg.queue_rows_per_clip * len(projected), self.queue.size)
            self.queue.push(rows[torch.randperm(len(rows), device=rows.device)[:per_clip]])
            if self.queue.full:
                scores = torch.cat([scores, head.scores(self.queue.contents())])
        assignment = sinkhorn_balanced(scores, self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iterations)
        return assignment[:len(rows)].unflatten(0, projected.shape[:2])

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clips = batch["clip"]  # (B, T, 3, H, W)
        c = self.cfg
        with torch.no_grad():  # the forwarder is training-free: earlier frames need no graph
            earlier = self.student.forward_features(clips[:, :-1].flatten(0, 1))
        last = self.student.forward_features(clips[:, -1])
        grid = last["grid"]
        batch_size, frames = clips.shape[:2]
        features = torch.cat([earlier["patches"].unflatten(0, (batch_size, frames - 1)),
                              last["patches"].detach()[:, None]], dim=1)  # (B, T, N, C)
        source = self.source_assignment(clips[:, 0], features[:, 0])
        with torch.no_grad(), torch.autocast(clips.device.type, enabled=False):
            propagated = feature_forwarder(features, source, grid, context=c.ff_context, radius=c.ff_window,
                                           topk=c.ff_topk, temperature=c.ff_temperature)[:, -1]
            labels = propagated.argmax(dim=-1)  # (B, N); ties go to the lowest index, as torch's argmax
        scores = self.student_head.scores(self.student_head(last["patches"]))
        loss = timet_loss(scores, labels, c.temperature)
        logs = {
            "label_clusters": torch.tensor(float(labels.unique().numel()), device=loss.device),
            "target_accuracy": (scores.detach().argmax(-1) == labels).float().mean(),
            "source_confidence": source.max(dim=-1).values.mean(),
        }
        return loss, logs

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.student_head.normalize_prototypes()
        if self.cfg.teacher == "none":
            return
        m = self.momentum(step)
        for teacher, student in self.teacher_pairs():
            teacher.update(student, 1.0 - m if self.cfg.teacher == "inverted" else m)
        self.teacher_head.net.normalize_prototypes()

    def backbone(self) -> nn.Module:
        return self.student  # the released models are the student's backbone

    def student_backbone(self) -> nn.Module:
        return self.student

    def teacher_pairs(self) -> list[tuple[EMATeacher, nn.Module]]:
        if self.cfg.teacher == "none":
            return []
        return [(self.teacher, self.student), (self.teacher_head, self.student_head)]
