"""SelfPatch: patch-level self-distillation with neighbour positives (Yun et al., CVPR 2022), multi-crop.

DINO's image-level loss plus a patch-level one (reference: alinlab/SelfPatch main_selfpatch.py).
The backbone is a ViT without a CLS token and without a final norm; a CaiT-style class-attention
head (``models.selfpatch_head.SelfPatchHead``) owns the CLS token and the last LayerNorm:

* student, every crop: CLS = class attention over the patches; patch n = LN(token n);
* teacher (EMA, no drop path), every crop: the same CLS, and for patch n a class-attention summary of
  the k = 4 of its 8 adjacent patches most cosine-similar to it in the teacher's tokens (n itself
  excluded). That summary is patch n's target: the student must predict, from the patch alone,
  what its most similar neighbours say.

Two DINO heads read the head's tokens: 65536 prototypes on the CLS, 4096 on the patches, each
teacher distribution centred by its own EMA center. L = L_cls + 0.1 L_patch, where L_cls is DINO's
loss (teacher global crops against every other student crop) and L_patch the cross-entropy at the
same position of the same crop, averaged per crop and then over all crops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import models
from models.heads import DINOHead
from models.selfpatch_head import SelfPatchHead
from train.objectives.base import Objective
from train.objectives.dino import (
    DINO, DINOConfig, at_least_fp32, dino_loss, entropy, teacher_targets, update_center_,
)
from train.teacher import EMATeacher


def patch_loss(student_logits: torch.Tensor, targets: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-view patch cross-entropy, (V,): mean over batch and positions of CE(target, student).

    Args:
        student_logits: (V, B, N, D) patch logits of V views with N patches each.
        targets: (V, B, N, D) teacher distributions at the same views and positions.
        student_temp: student softmax temperature.
    """
    log_probs = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)
    # as in dino_loss: under autocast the contraction would run (and sum 4096 terms) in bf16
    with torch.autocast(log_probs.device.type, enabled=False):
        xent = -torch.einsum("vbnd,vbnd->vbn", targets, log_probs)
    return xent.mean((1, 2))


def selfpatch_loss(student_cls: torch.Tensor, teacher_global_cls: torch.Tensor,
                   student_patches: list[torch.Tensor], teacher_patches: list[torch.Tensor],
                   center: torch.Tensor, patch_center: torch.Tensor, teacher_temp: float,
                   student_temp: float = 0.1, patch_weight: float = 0.1
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = L_cls + patch_weight * L_patch; returns (L, L_cls, L_patch).

    Args:
        student_cls: (V, B, D) CLS logits of every crop, view-major, the G global crops first.
        teacher_global_cls: (G, B, D) teacher CLS logits of the global crops.
        student_patches, teacher_patches: per resolution, (V_r, B, N_r, D_p) patch logits (the
            teacher's are the neighbour summaries), the groups in the order of ``student_cls``.
        center, patch_center: (1, D) and (1, D_p) teacher centers.

    L_cls is :func:`dino_loss` (the G*V - G pairs of different crops); L_patch is the mean over all
    V crops of :func:`patch_loss`, so a 36-patch local crop weighs as much as a 196-patch global one.
    """
    cls_loss = dino_loss(student_cls, teacher_targets(teacher_global_cls, center, teacher_temp), student_temp)
    per_view = [patch_loss(s, teacher_targets(t, patch_center, teacher_temp), student_temp)
                for s, t in zip(student_patches, teacher_patches, strict=True)]
    patch_term = torch.cat(per_view).mean()
    return cls_loss + patch_weight * patch_term, cls_loss, patch_term


@dataclass
class SelfPatchConfig(DINOConfig):
    """Knobs of SelfPatch (defaults: alinlab/SelfPatch main_selfpatch.py and its README for ViT-S/16).

    The image-level fields are DINO's; SelfPatch changes only the crop scales.
    """

    patch_out_dim: int = 4096
    """Prototypes of the patch head (SelfPatch's out_dim_selfpatch)."""
    neighbours: int = 4
    """k: adjacent patches (of the 8 in the 3x3 window) summarised into each patch's target (k_num)."""
    patch_loss_weight: float = 0.1
    """Weight of the patch-level loss (hard-coded 0.1 in the reference)."""
    neighbour_wraparound: bool = False
    """Wrap the 3x3 window around the grid borders, as SelfPatch's code does (true); the paper's
    spatially adjacent patches (false) leave border patches 5 and corners 3 real neighbours."""
    cls_center_over_all_crops: bool = False
    """Center the CLS head on the teacher outputs of all crops, as SelfPatch's code does (true); false
    uses the global crops only, as DINO (whose loss the paper adopts) does."""
    global_scale: tuple[float, float] = (0.25, 1.0)
    """Area range of a global crop (SelfPatch: 0.25-1; DINO: 0.4-1)."""
    local_scale: tuple[float, float] = (0.05, 0.25)
    """Area range of a local crop (SelfPatch: 0.05-0.25; DINO: 0.05-0.4)."""


class SelfPatchHeads(nn.Module):
    """Class-attention head and the two DINO heads on its tokens (SelfPatch's MultiCropWrapper without
    the backbone; its parameter names ``ca_head``, ``c_head``, ``p_head``)."""

    def __init__(self, cfg: SelfPatchConfig, dim: int, num_heads: int) -> None:
        super().__init__()
        self.ca_head = SelfPatchHead(dim, num_heads, cfg.neighbours, wrap=cfg.neighbour_wraparound)
        shape = dict(use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer, nlayers=cfg.head_layers,
                     hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
        self.c_head = DINOHead(dim, cfg.out_dim, **shape)
        self.p_head = DINOHead(dim, cfg.patch_out_dim, **shape)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int], local: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone tokens (B, N, dim) -> CLS logits (B, out_dim) and patch logits (B, N, patch_out_dim);
        ``local`` makes the patch tokens neighbour summaries (the teacher's targets)."""
        tokens = self.ca_head(patches, local=local, grid=grid)
        return self.c_head(tokens[:, 0]), self.p_head(tokens[:, 1:])


class SelfPatch(DINO):
    """Student (CLS-free ViT + SelfPatchHeads) against an EMA teacher on multi-crop views.

    Builds its own networks; the schedules (teacher temperature, momentum), the views, the EMA
    update, the exported backbone (the teacher) and the fine-tuning hooks are DINO's.
    """

    Config = SelfPatchConfig
    default_arch = "vit_small_patch16"

    def __init__(self, cfg: SelfPatchConfig, arch: str, drop_path: float = 0.1, *,
                 total_steps: int, steps_per_epoch: int) -> None:
        Objective.__init__(self)
        if not arch.startswith("vit_"):
            raise ValueError(f"selfpatch needs a ViT backbone (model.arch vit_*), not {arch}")
        self.cfg, self.arch = cfg, arch
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        vit = dict(class_token=False, final_norm=False)  # SelfPatch's backbone: its head owns both
        self.student = models.build(arch, drop_path=drop_path, **vit)
        if cfg.neighbour_wraparound:  # wrapped 3x3 windows repeat patches on grids under 3x3
            for name, size in (("global_size", cfg.global_size), ("local_size", cfg.local_size)):
                if size // self.student.patch_size < 3:
                    raise ValueError(f"selfpatch.{name} {size} gives a grid under 3x3 patches of "
                                     f"{self.student.patch_size} px: wrapped neighbourhoods need at least "
                                     f"{3 * self.student.patch_size} px, or set selfpatch.neighbour_wraparound false")
        self.student_head = SelfPatchHeads(cfg, self.student.embed_dim, self.student.num_heads)
        self.teacher = EMATeacher(self.student, twin=models.build(arch, drop_path=0.0, **vit))
        self.teacher_head = EMATeacher(self.student_head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, cfg.patch_out_dim))
        self.teacher_temp = cfg.warmup_teacher_temp

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # (B, crops, T, 3, H, W) -> view-major images (crops*T*B, 3, H, W), one group per resolution.
        groups = [batch["global"].flatten(1, 2).transpose(0, 1)]
        if "local" in batch:
            groups.append(batch["local"].flatten(1, 2).transpose(0, 1))
        num_global, batch_size = groups[0].shape[:2]
        student_cls, student_patches, teacher_cls, teacher_patches = [], [], [], []
        for views in groups:
            images = views.flatten(0, 1)
            features = self.student.forward_features(images)
            cls_logits, patch_logits = self.student_head(features["patches"], features["grid"], local=False)
            with torch.no_grad():
                tokens = self.teacher.net.forward_features(images)["patches"]
                t_cls, t_patch = self.teacher_head(tokens, features["grid"], local=True)
            student_cls.append(cls_logits)
            student_patches.append(patch_logits.unflatten(0, (-1, batch_size)))
            teacher_cls.append(t_cls.unflatten(0, (-1, batch_size)))
            teacher_patches.append(t_patch.unflatten(0, (-1, batch_size)))
            if len(student_patches) == 1:
                global_tokens = features["patches"].detach()
        loss, cls_loss, patch_term = selfpatch_loss(
            torch.cat(student_cls).unflatten(0, (-1, batch_size)), teacher_cls[0], student_patches, teacher_patches,
            self.center, self.patch_center, self.teacher_temp, self.cfg.student_temp, self.cfg.patch_loss_weight)
        with torch.no_grad():  # collapse monitors on the global crops, before the centers move
            cls_targets = teacher_targets(teacher_cls[0], self.center, self.teacher_temp)
            patch_targets = teacher_targets(teacher_patches[0], self.patch_center, self.teacher_temp)
        self.update_centers(teacher_cls, teacher_patches)
        logs = {
            "cls_loss": cls_loss.detach(), "patch_loss": patch_term.detach(),
            "teacher_entropy": entropy(cls_targets),
            "teacher_mean_entropy": entropy(cls_targets.mean((0, 1))),
            "teacher_patch_entropy": entropy(patch_targets),
            "teacher_patch_mean_entropy": entropy(patch_targets.flatten(0, -2).mean(0)),
            "feature_std": F.normalize(global_tokens.float(), dim=-1).flatten(0, 1).std(0).mean(),
        }
        return loss, logs

    @torch.no_grad()
    def update_centers(self, teacher_cls: list[torch.Tensor], teacher_patch: list[torch.Tensor]) -> None:
        """EMA of the teacher CLS logits' mean (global crops, or all crops with
        ``cls_center_over_all_crops``) and of every teacher patch logit of every crop, on all ranks."""
        m = self.cfg.center_momentum
        update_center_(self.center, teacher_cls if self.cfg.cls_center_over_all_crops else teacher_cls[:1], m)
        update_center_(self.patch_center, teacher_patch, m)

    def before_optimizer_step(self, step: int) -> None:
        if self.epoch(step) < self.cfg.freeze_last_layer_epochs:  # both heads' prototypes, as the reference
            for head in (self.student_head.c_head, self.student_head.p_head):
                for p in head.last_layer.parameters():
                    p.grad = None
