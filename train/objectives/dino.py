"""DINO: self-distillation with no labels (Caron et al., ICCV 2021), multi-crop.

A student sees every crop (2 global + L local); an EMA teacher sees the global crops only. The
student matches the teacher's centred, sharpened distribution over D prototypes on every pair of
different views. Centering and sharpening together keep the teacher from collapsing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import models
from models.heads import DINOHead
from pipeline import MulticropViews
from train.objectives.base import Objective
from train.optim import cosine_schedule
from train.sinkhorn import sinkhorn_balanced
from train.teacher import EMATeacher

SINKHORN_ITERATIONS = 3  # DINOv2's sinkhorn_knopp_teacher


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits to float32 (a softmax over 65536 prototypes needs it); float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def teacher_targets(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Centred and sharpened teacher distributions: softmax((t - c) / temperature), float32."""
    return F.softmax((at_least_fp32(teacher_logits) - center) / temperature, dim=-1)


def dino_loss(student_logits: torch.Tensor, targets: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean cross-entropy between teacher targets and student predictions over pairs of views.

    Args:
        student_logits: (V, B, D), view-major; the first G views are the teacher's views.
        targets: (G, B, D) teacher distributions from :func:`teacher_targets`.
        student_temp: student softmax temperature.

    A view is never matched with itself: the mean runs over the G*V - G pairs (g, v), v != g.
    """
    num_teacher_views, batch = targets.shape[:2]
    log_probs = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)
    # autocast would run the einsum's bmm in bf16 (a bf16 loss, 0.2 % gradient error): keep it fp32
    with torch.autocast(log_probs.device.type, enabled=False):
        xent = -torch.einsum("gbd,vbd->gv", targets, log_probs) / batch  # (G, V) mean over the batch
    same_view = torch.eye(*xent.shape, dtype=torch.bool, device=xent.device)
    return xent[~same_view].mean()


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """DINO's per-epoch teacher temperature: linear from warmup_temp to temp, then constant."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / max(warmup_epochs - 1, 1)


@torch.no_grad()
def update_center_(center: torch.Tensor, outputs: list[torch.Tensor], momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of every row of ``outputs`` on all ranks.

    ``outputs``: tensors (..., D) whose leading shapes may differ (e.g. global and local crops'
    patch logits); each row counts once. The sum and the row count are all-reduced.
    """
    total = sum(at_least_fp32(out).reshape(-1, out.shape[-1]).sum(0) for out in outputs)
    count = sum(out[..., 0].numel() for out in outputs)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        count *= dist.get_world_size()
    center.mul_(momentum).add_(total.view_as(center) / count, alpha=1 - momentum)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension, averaged over the rest."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()


@dataclass
class DistillationConfig:
    """The self-distillation knobs that DINO, SelfPatch and DoRA share: the projection head, the
    teacher's temperature and momentum, the center (defaults: facebookresearch/dino main_dino.py for
    ViT-S/16). Each method's config adds its views."""

    out_dim: int = 65536
    """Prototypes D of the head's last layer."""
    norm_last_layer: bool = True
    """Weight-normalise the last layer with its norm frozen at 1 (stabilises ViT-S)."""
    use_bn_in_head: bool = False
    """BatchNorm in the head's MLP."""
    head_hidden_dim: int = 2048
    """Width of the head's hidden layers."""
    head_bottleneck_dim: int = 256
    """Width before the L2-normalised last layer."""
    head_layers: int = 3
    """Linear layers of the head's MLP."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    teacher_temp: float = 0.04
    """Teacher temperature after warm-up."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at epoch 0."""
    warmup_teacher_temp_epochs: int = 0
    """Epochs of linear teacher-temperature warm-up (the long ViT-S/16 run used 30, to 0.07)."""
    momentum_teacher: float = 0.996
    """Initial EMA momentum of the teacher; cosine to 1 over training."""
    center_momentum: float = 0.9
    """EMA momentum of the teacher-output center."""
    freeze_last_layer_epochs: int = 1
    """Epochs during which the head's last layer gets no update."""


@dataclass
class DINOConfig(DistillationConfig):
    """Knobs of DINO (defaults: facebookresearch/dino main_dino.py for ViT-S/16): the distillation
    knobs and the multi-crop views."""

    global_crops: int = 2
    """Global crops per image (the teacher's views)."""
    global_size: int = 224
    """Side of a global crop."""
    global_scale: tuple[float, float] = (0.4, 1.0)
    """Area range of a global crop."""
    local_crops: int = 8
    """Local crops per image (student only)."""
    local_size: int = 96
    """Side of a local crop."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of a local crop."""
    centering: Literal["center", "sinkhorn"] = "center"
    """What keeps the teacher from collapsing: "center", DINO's EMA center subtracted before sharpening;
    "sinkhorn", DINOv2's Sinkhorn-Knopp centering (3 iterations at the teacher temperature), which
    spreads each batch's teacher outputs evenly over the prototypes and keeps no running statistic."""


class DINO(Objective):
    """Student (backbone + head) trained against an EMA teacher on multi-crop views."""

    Config = DINOConfig
    default_arch = "vit_small_patch16"

    def __init__(self, cfg: DINOConfig, arch: str, drop_path: float = 0.1, *,
                 total_steps: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.cfg, self.arch = cfg, arch
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.student = models.build(arch, drop_path=drop_path)
        self.student_head = DINOHead(
            self.student.embed_dim, cfg.out_dim, use_bn=cfg.use_bn_in_head,
            norm_last_layer=cfg.norm_last_layer, nlayers=cfg.head_layers,
            hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim,
        )
        # The teacher has no stochastic depth; it starts as an exact copy of the student.
        self.teacher = EMATeacher(self.student, twin=models.build(arch, drop_path=0.0))
        self.teacher_head = EMATeacher(self.student_head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.teacher_temp = cfg.warmup_teacher_temp

    def views(self) -> MulticropViews:
        c = self.cfg
        return MulticropViews(
            frames=1, stride=1, flip=True, color=True,
            global_crops=c.global_crops, global_size=c.global_size, global_scale=c.global_scale,
            local_crops=c.local_crops, local_size=c.local_size, local_scale=c.local_scale,
        )

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def begin_step(self, step: int) -> dict[str, float]:
        c = self.cfg
        self.teacher_temp = teacher_temperature(
            self.epoch(step), c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)
        return {"teacher_temp": self.teacher_temp, "momentum": self.momentum(step)}

    def momentum(self, step: int) -> float:
        return cosine_schedule(step, self.cfg.momentum_teacher, 1.0, self.total_steps)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # (B, crops, T, 3, H, W) -> view-major images (crops*T*B, 3, H, W): every frame of a crop is a view.
        global_views = batch["global"].flatten(1, 2).transpose(0, 1)
        num_global, batch_size = global_views.shape[:2]
        global_images = global_views.flatten(0, 1)
        # One backbone call per resolution, one head call for all views (DINO's MultiCropWrapper).
        features = [self.student(global_images)]
        if "local" in batch:
            features.append(self.student(batch["local"].flatten(1, 2).transpose(0, 1).flatten(0, 1)))
        student_logits = self.student_head(torch.cat(features)).unflatten(0, (-1, batch_size))
        with torch.no_grad():
            teacher_logits = self.teacher_head(self.teacher(global_images)).unflatten(0, (num_global, batch_size))
            if self.cfg.centering == "sinkhorn":
                targets = sinkhorn_balanced(at_least_fp32(teacher_logits).flatten(0, 1), self.teacher_temp,
                                            SINKHORN_ITERATIONS).view_as(teacher_logits)
            else:
                targets = teacher_targets(teacher_logits, self.center, self.teacher_temp)
                self.update_center(teacher_logits)
        loss = dino_loss(student_logits, targets, self.cfg.student_temp)
        logs = {
            "teacher_entropy": entropy(targets),
            "teacher_mean_entropy": entropy(targets.mean((0, 1))),
            "feature_std": F.normalize(features[0].detach().float(), dim=-1).std(0).mean(),
        }
        return loss, logs

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the teacher outputs' mean over views, batch and all ranks."""
        update_center_(self.center, [teacher_logits], self.cfg.center_momentum)

    def before_optimizer_step(self, step: int) -> None:
        if self.epoch(step) < self.cfg.freeze_last_layer_epochs:
            for p in self.student_head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = self.momentum(step)
        for teacher, student in self.teacher_pairs():
            teacher.update(student, m)

    def backbone(self) -> nn.Module:
        return self.teacher.net  # DINO evaluates the teacher

    def student_backbone(self) -> nn.Module:
        return self.student

    def teacher_pairs(self) -> list[tuple[EMATeacher, nn.Module]]:
        return [(self.teacher, self.student), (self.teacher_head, self.student_head)]
