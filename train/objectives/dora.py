"""DoRA: discover and track objects in one long video, and distil on the tracked objects
(Venkataramanan et al., "Is ImageNet worth 1 video?", ICLR 2024; reference shashankvkt/DoRA_ICLR24).

DINO's teacher-student distillation, made temporal by a training-free multi-object tracker built from
the teacher's last block:

1. discovery: in frame 0 of the clip, the CLS-attention of k distinct heads weights the patch queries
   into k object prototypes; a per-sample Sinkhorn-Knopp assignment of the normalised patch tokens
   to those prototypes refines them (each object gets about N / k patches);
2. tracking: in every frame, each refined prototype attends over that frame's keys; the patches whose
   attention is above the mean form the object's mask in that frame;
3. distillation: the student sees the clip masked to each tracked object (k clips) and the local
   crops; every student frame is matched with the teacher's distribution on the same unmasked frame.

The DINO pieces (head, teacher, center, schedules, last-layer freeze) are DINO's, reused as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline import MulticropViews
from train.objectives.dino import DINO, DistillationConfig, at_least_fp32, entropy, teacher_targets
from train.sinkhorn import sinkhorn_per_sample


@torch.no_grad()
def discover_objects(cls_attention: torch.Tensor, queries: torch.Tensor, tokens: torch.Tensor,
                     heads: torch.Tensor, epsilon: float, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Object prototypes of frame 0 from k attention heads, refined by Sinkhorn-Knopp.

    Args:
        cls_attention: (B, H, N) last-block attention of the CLS token to the N patches.
        queries: (B, N, C) last-block patch queries, heads concatenated (C = H * head_dim).
        tokens: (B, N, C) final (normed) patch tokens.
        heads: (k,) distinct head indices; head i's attention makes object i.
        epsilon, iterations: Sinkhorn-Knopp temperature and rounds (DoRA 0.05, 30).

    Returns:
        prototypes (B, k, C): the assignment-weighted sums of the L2-normalised tokens;
        assignment (B, N, k): each patch's soft assignment (rows sum to 1, columns about N / k).

    The initial prototypes are attention-weighted sums of queries and are not normalised (pitfall D6),
    so the logits scale with the query norms; the per-sample max-subtraction keeps exp finite.
    """
    initial = torch.einsum("bkn,bnc->bkc", cls_attention[:, heads], queries)
    unit_tokens = F.normalize(tokens, dim=-1)
    assignment = sinkhorn_per_sample(unit_tokens @ initial.transpose(1, 2), epsilon, iterations)
    return assignment.transpose(1, 2) @ unit_tokens, assignment


@torch.no_grad()
def track_objects(prototypes: torch.Tensor, keys: torch.Tensor, threshold: str = "image") -> torch.Tensor:
    """Masks of each object in each frame: the patches whose prototype attention is above the mean.

    Args:
        prototypes: (B, k, C) refined prototypes (:func:`discover_objects`).
        keys: (T, B, N, C) last-block patch keys of every frame, heads concatenated.
        threshold: "image" compares each frame's attention with its own mean over the N patches;
            "batch" with the mean over the whole (B, N) batch per object and frame, as the reference
            code does (pitfall D4: one sample's mask then depends on the other samples).

    Returns:
        (k, B, T, N) bool masks. The attention of object i in frame t is
        softmax_n(P_i . K_t,n / sqrt(C)), L2-normalised over n before the comparison.
    """
    scale = prototypes.shape[-1] ** -0.5
    attention = torch.einsum("bkc,tbnc->kbtn", prototypes, keys).mul(scale).softmax(dim=-1)
    unit = F.normalize(attention, dim=-1)
    if threshold == "image":
        level = unit.mean(dim=-1, keepdim=True)
    elif threshold == "batch":
        level = unit.mean(dim=(1, 3), keepdim=True)
    else:
        raise ValueError(f"threshold must be 'image' or 'batch', got {threshold!r}")
    return unit > level


def mask_frames(frames: torch.Tensor, masks: torch.Tensor, patch_size: int, keep: bool = True) -> torch.Tensor:
    """Each object's clip: the frames with the patches outside (keep) or inside (remove) its mask zeroed.

    Args:
        frames: (B, T, 3, H, W) normalised images (zero is the mean colour, pitfall D5).
        masks: (k, B, T, h*w) bool patch masks on the (H / p, W / p) grid.
        patch_size: p.
        keep: True keeps the object (the reference code), False removes it.

    Returns:
        (k, B, T, 3, H, W): frames times the mask nearest-upsampled by p (a broadcast, no copy of
        the upsampled mask).
    """
    B, T, C, H, W = frames.shape
    h, w = H // patch_size, W // patch_size
    weight = masks.to(frames.dtype) if keep else (~masks).to(frames.dtype)
    weight = weight.view(-1, B, T, 1, h, 1, w, 1)
    patches = frames.view(1, B, T, C, h, patch_size, w, patch_size)
    return (patches * weight).view(-1, B, T, C, H, W)


def dora_loss(masked_logits: torch.Tensor, local_logits: torch.Tensor, targets: torch.Tensor,
              student_temp: float, skip_local_crop0: bool = False,
              accumulation_bug: bool = False) -> torch.Tensor:
    """DINO cross-entropy between each teacher frame and the student's views of the same frame.

    Args:
        masked_logits: (k, T, B, D) student logits on the k object-masked clips.
        local_logits: (L, T, B, D) student logits on the local crops.
        targets: (T, B, D) teacher distributions on the unmasked frames (:func:`teacher_targets`).
        student_temp: student softmax temperature.
        skip_local_crop0: leave local crop 0 out (the reference's leftover `v == iq` test, D2).
        accumulation_bug: combine the objects as the reference's shared `frame_loss` accumulator
            does (D1): fl_i = (fl_{i-1} + S_i) / T, L = mean_i fl_i; otherwise L = mean_i S_i / T.

    With CE_b(q, s) the batch-mean cross-entropy, S_i = sum over frames t of
    (CE(q_t, s_masked_i,t) + mean over the used local crops v of CE(q_t, s_local_v,t)) / 2.
    """
    objects, frames, batch = masked_logits.shape[:3]
    used_locals = local_logits[1:] if skip_local_crop0 else local_logits
    if used_locals.shape[0] == 0:
        raise ValueError("dora_loss needs at least one local crop to use (skip_local_crop0 drops crop 0)")
    logits = torch.cat([masked_logits, used_locals])                        # (k + L', T, B, D)
    log_probs = F.log_softmax(at_least_fp32(logits) / student_temp, dim=-1)
    with torch.autocast(log_probs.device.type, enabled=False):             # as dino_loss: fp32 einsum
        xent = -torch.einsum("tbd,vtbd->vt", targets, log_probs) / batch     # (k + L', T)
    per_frame = 0.5 * (xent[:objects] + xent[objects:].mean(0))             # (k, T)
    per_object = per_frame.sum(1)                                           # S_i
    if not accumulation_bug:
        return per_object.mean() / frames
    accumulated, total = per_object.new_zeros(()), per_object.new_zeros(())
    for s in per_object:
        accumulated = (accumulated + s) / frames
        total = total + accumulated
    return total / objects


@dataclass
class DoRAConfig(DistillationConfig):
    """Knobs of DoRA (defaults: the DoRA README command for ViT-S/16 on one Walking Tours video): the
    distillation knobs, the object discovery and tracking, and the clip views."""

    objects: int = 3
    """Objects k discovered per clip, one per randomly chosen attention head (at most the head count)."""
    head_choice: Literal["random", "first"] = "random"
    """random: k distinct heads drawn every step, the same for the whole batch (paper and code);
    first: always heads 0..k-1 (deterministic, for debugging)."""
    sinkhorn_epsilon: float = 0.05
    """Temperature of the Sinkhorn-Knopp refinement of the prototypes."""
    sinkhorn_iterations: int = 30
    """Sinkhorn-Knopp rounds."""
    mask_threshold: Literal["image", "batch"] = "image"
    """image: a mask keeps the patches above its own frame's mean attention; batch: above the mean over
    the whole batch, as the reference code does (its masks depend on the batch, pitfall D4)."""
    keep_object: bool = True
    """True: the student sees the tracked object (pixels outside it set to the mean colour), as the
    code does; False: the object is removed instead (pitfall D5)."""
    frame_loss_accumulation_bug: bool = False
    """Reproduce the reference's object weights (1/8 + 1/64 + 1/512, 1/8 + 1/64, 1/8)/3 for T = 8 from
    its shared accumulator (pitfall D1); false: every object weighs 1/(3T)."""
    skip_local_crop0: bool = False
    """Leave local crop 0 out of the loss, as the reference code does (pitfall D2; it is still computed)."""
    frames: int = 8
    """Frames T per clip."""
    frame_stride: int = 20
    """Packed frames between consecutive clip frames (the reference's step_between_clips: 60 native
    frames = 2 s at 30 fps, i.e. 20 packed frames at pack.py --fps 10)."""
    region_scale: tuple[float, float] = (0.2, 1.0)
    """Area range of the clip-level region (the reference's first RandomResizedCrop to 300 px) that
    every crop is drawn from."""
    global_size: int = 224
    """Side of the global clip crop (shared geometry and flip across frames, colour per frame)."""
    global_scale: tuple[float, float] = (0.4, 1.0)
    """Area range of the global crop inside the region."""
    local_crops: int = 6
    """Local crops per clip; each frame of a local crop has its own box and colour."""
    local_size: int = 112
    """Side of a local crop."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of a local crop inside the region."""
    # Redefined from DistillationConfig: the DoRA README's values.
    norm_last_layer: bool = False
    """Weight-normalise the last layer with its norm frozen at 1 (the README trains it: false)."""
    warmup_teacher_temp_epochs: int = 30
    """Epochs of linear teacher-temperature warm-up (the README's 30; no effect while both are 0.04)."""

    def __post_init__(self) -> None:
        if self.objects < 1 or self.frames < 1 or self.frame_stride < 1:
            raise ValueError("dora.objects, dora.frames and dora.frame_stride must be >= 1")
        if self.local_crops < 1 + self.skip_local_crop0:
            raise ValueError(f"dora.local_crops={self.local_crops}: the loss needs at least one local crop "
                             "(two with dora.skip_local_crop0)")


class DoRA(DINO):
    """DINO's student, teacher and center, trained on tracked-object clips and per-frame local crops."""

    Config = DoRAConfig
    default_arch = "vit_small_patch16"

    def __init__(self, cfg: DoRAConfig, arch: str, drop_path: float = 0.1, *,
                 total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(cfg, arch, drop_path, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        num_heads = self.teacher.net.num_heads
        if cfg.objects > num_heads:
            raise ValueError(f"dora.objects={cfg.objects}: {arch} has only {num_heads} attention heads "
                             "(one object per head)")

    def views(self) -> MulticropViews:
        c = self.cfg
        # every crop is drawn inside a clip-level region (the reference's 300 px crop)
        return MulticropViews(
            frames=c.frames, stride=c.frame_stride, region=True, scale=c.region_scale,
            flip=True, color=True, per_frame_color=True, per_frame_local_boxes=True, global_blur=(0.1, 0.1),
            global_crops=1, global_size=c.global_size, global_scale=c.global_scale,
            local_crops=c.local_crops, local_size=c.local_size, local_scale=c.local_scale,
        )

    def choose_heads(self) -> torch.Tensor:
        """The k heads of this step (the reference's `random.sample`, from torch's seeded RNG here)."""
        if self.cfg.head_choice == "first":
            return torch.arange(self.cfg.objects)
        return torch.randperm(self.teacher.net.num_heads)[:self.cfg.objects]

    @torch.no_grad()
    def teach(self, clip: torch.Tensor, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits (T, B, D) on the unmasked frames of clip (B, T, 3, H, W) and the object masks
        (k, B, T, N) tracked through them."""
        batch, frames = clip.shape[:2]
        images = clip.transpose(0, 1).flatten(0, 1)                         # frame-major (T*B, 3, H, W)
        out = self.teacher.net.forward_features(images, return_attention=True, return_keys=True,
                                                return_queries=True)
        prefix = self.teacher.net.num_prefix_tokens
        logits = self.teacher_head(out["cls"]).unflatten(0, (frames, batch))
        first = slice(0, batch)                                             # frame 0 of every clip
        cls_attention = out["attention"][first, :, 0, prefix:]
        queries = out["queries"][first, :, prefix:].transpose(1, 2).flatten(2)
        keys = out["keys"][:, :, prefix:].transpose(1, 2).flatten(2).unflatten(0, (frames, batch))
        # the tracker runs in float32 at least (bf16 queries and keys under autocast)
        prototypes, _ = discover_objects(at_least_fp32(cls_attention), at_least_fp32(queries),
                                         at_least_fp32(out["patches"][first]), heads,
                                         self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iterations)
        return logits, track_objects(prototypes, at_least_fp32(keys), self.cfg.mask_threshold)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clip = batch["global"][:, 0]                                        # (B, T, 3, H, W)
        batch_size, frames = clip.shape[:2]
        teacher_logits, masks = self.teach(clip, self.choose_heads())
        targets = teacher_targets(teacher_logits, self.center, self.teacher_temp)
        masked = mask_frames(clip, masks, self.student.patch_size, self.cfg.keep_object)
        # One backbone call per resolution, one head call for all views, every view frame-major.
        masked_images = masked.transpose(1, 2).flatten(0, 2)                # (k*T*B, 3, H, W)
        local_images = batch["local"].permute(1, 2, 0, 3, 4, 5).flatten(0, 2)   # (L*T*B, 3, h, w)
        features = [self.student(masked_images), self.student(local_images)]
        logits = self.student_head(torch.cat(features)).unflatten(0, (-1, frames, batch_size))
        objects = masks.shape[0]
        loss = dora_loss(logits[:objects], logits[objects:], targets, self.cfg.student_temp,
                         self.cfg.skip_local_crop0, self.cfg.frame_loss_accumulation_bug)
        self.update_center(teacher_logits)
        logs = {
            "teacher_entropy": entropy(targets),
            "teacher_mean_entropy": entropy(targets.mean((0, 1))),
            "feature_std": F.normalize(features[0].detach().float(), dim=-1).std(0).mean(),
            "mask_fraction": masks.float().mean(),
        }
        return loss, logs
