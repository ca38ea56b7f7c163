"""NeCo: patch-neighbour consistency (Pariza et al., "Near, far: Patch-ordering enhances vision foundation
models' scene understanding", ICLR 2025), a post-training of a pretrained ViT (DINOv2-R, DINO) for dense tasks.

Each image gives G global and L local crops whose boxes overlap (``pipeline``'s ``min_overlap``). For every
pair (global crop g, other crop v):

1. the EMA teacher's projected patches of g and the student's of v are ROI-aligned to their overlap, a
   k x k grid of aligned patches (k = ``roi_size``) per image, seen from both crops;
2. each image gets k*k reference patches: teacher patches of the pair's other images (or of a queue);
3. the distances of every aligned patch to the references are sorted by a differentiable sorting network
   (``diffsort``), giving a soft permutation matrix per patch, for the student and for the teacher;
4. the loss is the cross-entropy of the student's permutation rows against the teacher's (over the
   foreground, background or all patches), averaged over pairs.

The student learns to order its neighbours as the teacher orders them from the other view. Defaults are the
reference's DINOv2-R ViT-S/14 224 px recipe (vpariza/NeCo experiments/configs/neco_224x224.yml); paper-vs-code
flags are in docs/objectives.md (NeCo section).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.heads import MLP
from pipeline import MulticropViews
from train.objectives.base import Objective
from train.optim import cosine_schedule
from train.queue import FeatureQueue
from train.teacher import EMATeacher


# ---------------------------------------------------------------- pure functions


def sorting_network(kind: str, size: int, steepness: float, device: torch.device):
    """diffsort's relaxed sorting network (``bitonic`` or ``odd_even``) over ``size`` values, Cauchy
    comparators of the given steepness; it maps (R, size) values to (sorted, P) with P (R, size, size),
    P[r, i, j] the weight of value i at sorted (ascending) position j."""
    try:
        from diffsort import DiffSortNet
    except ImportError as err:
        raise ImportError("NeCo needs diffsort: pip install diffsort==0.2.0") from err
    return DiffSortNet(kind, size, device=device, steepness=steepness)


def pairwise_distances(queries: torch.Tensor, references: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, N, D) queries, (B, M, D) references -> (B, N, M): euclidean distances, or cosine
    similarities for ``cosine`` (as the reference sorts them: nearest last)."""
    if metric == "euclidean":
        return torch.cdist(queries, references, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary")
    if metric == "cosine":
        return torch.einsum("bnd,bmd->bnm", F.normalize(queries, dim=-1), F.normalize(references, dim=-1))
    raise ValueError(f"unknown NeCo distance {metric!r}: choose euclidean or cosine")


def soft_permutations(distances: torch.Tensor, sorter) -> torch.Tensor:
    """(B, N, M) distances -> (B, N, M, M) soft permutation matrices: [b, n, i, j] is how much reference i
    of query n sits at rank j (float32 at least; the network's 20-odd layers of products lose bf16)."""
    rows = distances.flatten(0, 1)
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    with torch.autocast(rows.device.type, enabled=False):
        return sorter(rows)[1].unflatten(0, distances.shape[:2])


def neco_loss(teacher_perm: torch.Tensor, student_perm: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the student's soft ranks of each reference against the teacher's.

    Args:
        teacher_perm, student_perm: (B, N, M, M) from :func:`soft_permutations` (N query patches).
        mask: optional (B, N) bool, the query patches that count (NeCo's fg / bg masks).

    Returns the mean over queries and references of -sum_rank q log p; with a mask, over the masked queries
    (0 when none is).
    """
    xent = -(teacher_perm * torch.log(student_perm)).sum(-1)  # (B, N, M)
    if mask is None:
        return xent.mean()
    weights = mask.to(xent.dtype)[..., None]
    count = weights.sum() * xent.shape[-1]
    return (xent * weights).sum() / count if count > 0 else xent.sum() * 0.0


def overlap_boxes(boxes: torch.Tensor, flips: torch.Tensor, view: int, other: int, grid: float) -> torch.Tensor:
    """The overlap of crops ``view`` and ``other`` in ``view``'s patch-grid coordinates.

    Args:
        boxes: (B, V, 4) crop boxes x0, y0, x1, y1 in frame pixels; flips: (B, V) mirrored views.
        grid: the view's side in patches (its side in pixels / patch size; need not be whole).

    Returns (B, 4) x0, y0, x1, y1 as ROI-align boxes on the view's (grid x grid) feature map.
    """
    mine, theirs = boxes[:, view].double(), boxes[:, other].double()
    inter = torch.cat([torch.maximum(mine[:, :2], theirs[:, :2]), torch.minimum(mine[:, 2:], theirs[:, 2:])], 1)
    size = (mine[:, 2:] - mine[:, :2]).repeat(1, 2)
    out = (inter - mine[:, :2].repeat(1, 2)) / size * grid
    mirrored = torch.stack([grid - out[:, 2], out[:, 1], grid - out[:, 0], out[:, 3]], 1)
    return torch.where(flips[:, view, None], mirrored, out)


def roi_grid(maps: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) maps, (B, 4) boxes in map cells -> (B, C, size, size): torchvision's ``roi_align``
    with half-pixel alignment and adaptive sampling, one box per map (NeCo's call)."""
    from torchvision.ops import roi_align

    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=maps.dtype)[:, None],
                      boxes.to(maps.dtype)], 1)
    return roi_align(maps, rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def draw_references(patches: torch.Tensor, mode: str, mask: torch.Tensor | None = None,
                    queue: torch.Tensor | None = None) -> torch.Tensor | None:
    """k*k reference patches per image for one pair: (B, N, D) teacher patches -> (B, N, D).

    mode ``other_images`` (the paper): image b's references are drawn without replacement from the other
    images' patches (its own with a batch of one). ``batch`` (the code): a random permutation of all
    the batch's patches, each image's own included. A (B, N) ``mask`` keeps only those patches (fg / bg),
    repeated to fill the N slots as the code does. A ``queue`` (Q, D) of past teacher patches replaces
    the batch: N rows per image at random (the code's ``randperm(Q)[:B*N] % filled``).
    Returns None when the mask keeps nothing (the pair is skipped).
    """
    B, N, D = patches.shape
    device = patches.device
    if queue is not None:
        rows = torch.randperm(max(len(queue), B * N), device=device)[:B * N] % len(queue)
        return queue[rows].to(patches.dtype).reshape(B, N, D)
    flat = patches.reshape(B * N, D)
    keep = torch.ones(B * N, dtype=torch.bool, device=device) if mask is None else mask.reshape(-1)
    if not keep.any():
        return None
    if mode == "batch" or B == 1:
        kept = flat[keep]
        kept = kept.repeat(round(B * N / len(kept)) + 1, 1)[:B * N]
        return kept[torch.randperm(B * N, device=device)].reshape(B, N, D)
    if mode != "other_images":
        raise ValueError(f"unknown NeCo reference mode {mode!r}: choose other_images or batch")
    owner = torch.arange(B, device=device).repeat_interleave(N)
    out = []
    for b in range(B):
        pool = flat[keep & (owner != b)]
        if len(pool) == 0:
            pool = flat[keep]
        pool = pool.repeat(N // len(pool) + 1, 1) if len(pool) < N else pool
        out.append(pool[torch.randperm(len(pool), device=device)[:N]])
    return torch.stack(out)


def foreground_masks(attention: torch.Tensor, grid: int, keep_mass: float = 0.6, sigma: float = 0.6) -> torch.Tensor:
    """NeCo's / Leopart's foreground from the teacher's last attention: (B, heads, N) CLS-to-patch maps
    -> (B, 1, grid, grid) float {0, 1}. Mean over heads, 7 x 7 Gaussian blur (reflect padding), the
    patches holding the top ``keep_mass`` of the attention, components of at most 2 patches dropped
    (8-connectivity)."""
    from scipy import ndimage
    from torchvision.transforms.functional import gaussian_blur

    maps = attention.float().mean(1).reshape(-1, 1, grid, grid)
    side = min(7, 2 * grid - 1)  # reflect padding needs a pad below the side (tiny test grids)
    maps = gaussian_blur(maps, [side, side], [sigma, sigma]).flatten(1)
    values, order = torch.sort(maps, dim=-1)
    values = values / values.sum(-1, keepdim=True)
    kept_sorted = torch.cumsum(values, -1) > (1 - keep_mass)
    kept = torch.zeros_like(kept_sorted).scatter_(1, order, kept_sorted).reshape(-1, grid, grid)
    out = kept.cpu().numpy().astype(np.float32)
    for image in out:
        labels, count = ndimage.label(image, structure=np.ones((3, 3)))
        for k in range(1, count + 1):
            if (labels == k).sum() <= 2:
                image[labels == k] = 0
    return torch.from_numpy(out).to(attention.device)[:, None]


def multicrop_neco_loss(teacher_maps: list[torch.Tensor], student_maps: list[torch.Tensor], boxes: torch.Tensor,
                        flips: torch.Tensor, grids: list[float], *, roi_size: int, distance: str, references: str,
                        student_sorter, teacher_sorter, fg: torch.Tensor | None = None,
                        queues: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, dict]:
    """NeCo's loss over every (global crop g, other crop v) pair, averaged as the reference: the mean over
    the V - 1 partners of g, then over the G global crops.

    Args:
        teacher_maps: G maps (B, C, h, w) of the teacher's projected patches of the global crops.
        student_maps: V maps (B, C, h_v, w_v) of the student's, globals first.
        boxes, flips: (B, V, 4) crop boxes in frame pixels and (B, V) flips (the pipeline's ``boxes``, ``flip``).
        grids: each view's side in patches (pixels / patch size).
        fg: optional (G, B, 1, h, w) {0, 1} masks of the query patches that count (fg or bg).
        queues: per global crop, optional (Q, C) past teacher patches to draw references from.
    Returns the loss and detached statistics (teacher rank entropy, masked fraction).
    """
    G, V, k = len(teacher_maps), len(student_maps), roi_size
    loss = teacher_maps[0].new_zeros(())
    entropies, fractions = [], []
    for g in range(G):
        partners = teacher_maps[0].new_zeros(())
        for v in range(V):
            if v == g:
                continue
            with torch.no_grad():
                box_t = overlap_boxes(boxes, flips, g, v, grids[g])
                teacher_grid = roi_grid(teacher_maps[g], box_t, k).flatten(2).transpose(1, 2)  # (B, k*k, C)
                mask = None
                if fg is not None:
                    mask = roi_grid(fg[g], box_t, k).flatten(1) >= 1.0  # every sample inside the mask
                    fractions.append(mask.float().mean())
                queue = queues[g] if queues is not None else None
                refs = draw_references(teacher_grid, references, mask, queue)
                if refs is None:
                    continue
                teacher_perm = soft_permutations(pairwise_distances(teacher_grid, refs, distance), teacher_sorter)
                entropies.append(-(teacher_perm * torch.log(teacher_perm.clamp_min(1e-12))).sum(-1).mean())
            box_s = overlap_boxes(boxes, flips, v, g, grids[v])
            student_grid = roi_grid(student_maps[v], box_s, k).flatten(2).transpose(1, 2)
            student_perm = soft_permutations(pairwise_distances(student_grid, refs, distance), student_sorter)
            partners = partners + neco_loss(teacher_perm, student_perm, mask)
        loss = loss + partners / (V - 1)
    stats = {}
    if entropies:
        stats["teacher_rank_entropy"] = torch.stack(entropies).mean()
    if fractions:
        stats["mask_fraction"] = torch.stack(fractions).mean()
    return loss / G, stats


# ---------------------------------------------------------------- the objective


@dataclass
class NeCoConfig:
    """Knobs of NeCo (defaults: vpariza/NeCo experiments/configs/neco_224x224.yml, DINOv2-R ViT-S/14)."""

    proj_dim: int = 256
    """Width of the projected, L2-normalised patch features that are sorted."""
    proj_hidden_dim: int = 2048
    """Width of the projection MLP's hidden layers."""
    proj_layers: int = 3
    """Linear layers of the projection MLP (GELU between them)."""
    roi_size: int = 7
    """Side k of the ROI-aligned grid of each crop pair: k*k query patches and k*k references per image."""
    distance: Literal["cosine", "euclidean"] = "cosine"
    """Distances that are sorted: cosine similarity (the 224 recipe) or euclidean distance (the code's default)."""
    sort_net: Literal["bitonic", "odd_even"] = "bitonic"
    """diffsort's sorting network."""
    student_steepness: float = 100.0
    """Steepness of the student's relaxed comparators."""
    teacher_steepness: float = 100.0
    """Steepness of the teacher's relaxed comparators."""
    loss_mask: Literal["all", "fg", "bg"] = "all"
    """Query patches the loss covers: all, or the foreground / background of the teacher's last attention."""
    references: Literal["other_images", "batch"] = "other_images"
    """Where an image's reference patches come from: the other images of the batch (the paper), or a random
    permutation of all the batch's patches, its own included (the code)."""
    queue_size: int = 0
    """Rows of past teacher patches per global crop to draw references from instead of the batch (the 518 px
    recipes: 8192; the 224 px recipe leaves it off). 0: no queue."""
    queue_rows_per_image: int = 10
    """Random teacher patches of each image pushed into each global crop's queue per step (the code: 10 x batch)."""
    momentum_teacher: float = 0.9995
    """Teacher EMA momentum at step 0; cosine to 1 at the end."""
    global_crops: int = 2
    """Global crops per image (seen by teacher and student)."""
    global_size: int = 224
    """Side of a global crop."""
    global_scale: tuple[float, float] = (0.25, 1.0)
    """Area range of a global crop."""
    local_crops: int = 4
    """Local crops per image (student only)."""
    local_size: int = 98
    """Side of a local crop."""
    local_scale: tuple[float, float] = (0.05, 0.25)
    """Area range of a local crop."""
    min_overlap: float = 0.01
    """Least overlap of a crop with each earlier global crop, as a fraction of the frame (2x between globals)."""
    flip: bool = False
    """Horizontal flips of the crops (the reference has none; the overlap boxes follow a flip)."""
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    """Colour-jitter strengths (the reference's jitter_strength 1.0), applied with p 0.8."""
    frames: int = 1
    """1: image mode (the paper). 2: a video variant, the crops alternate between frames t and t + frame_stride
    of one clip (global crop g and local crop l from frame g mod 2, l mod 2), overlaps taken in frame pixels."""
    frame_stride: int = 30
    """Gap in packed frames between the two frames of the video variant (1 s at 30 fps)."""
    grad_checkpointing: bool = True
    """Recompute the student's blocks in the backward pass (the default batch then fits 24 GB at 224 px)."""

    def __post_init__(self) -> None:
        if self.global_crops < 1 or self.global_crops + self.local_crops < 2:
            raise ValueError("neco: needs a global crop and at least one other crop")
        if self.frames not in (1, 2):
            raise ValueError(f"neco.frames={self.frames}: 1 (images) or 2 (the video variant)")


class NeCo(Objective):
    """Student ViT + projection, EMA teacher; sorting-consistency loss on the crops' overlaps."""

    Config = NeCoConfig
    default_arch = "vit_small_patch14_reg4_dinov2"

    def __init__(self, cfg: NeCoConfig, arch: str, drop_path: float = 0.1, *,
                 total_steps: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.cfg, self.total_steps = cfg, total_steps
        self.student = models.build(arch, drop_path=drop_path)
        self.student.grad_checkpointing = cfg.grad_checkpointing  # not in build_spec: exports rebuild without it
        self.student_head = MLP(self.student.embed_dim, cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_layers)
        for module in self.student_head.modules():  # the reference's timm init of every Linear
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.teacher = EMATeacher(self.student, twin=models.build(arch, drop_path=0.0))
        self.teacher_head = EMATeacher(self.student_head)
        self.queues = nn.ModuleList(FeatureQueue(cfg.queue_size, cfg.proj_dim) for _ in range(cfg.global_crops)
                                    ) if cfg.queue_size else None
        self._sorters: dict = {}

    def views(self) -> MulticropViews:
        c = self.cfg
        # NeCoTransforms' colour: jitter p 0.8, grayscale 0.2, blur p 0.5 on every crop, no solarize
        return MulticropViews(frames=c.frames, stride=c.frame_stride if c.frames > 1 else 1,
                              flip=c.flip, color=True, jitter=c.jitter, global_crops=c.global_crops,
                              global_size=c.global_size, global_scale=c.global_scale, local_crops=c.local_crops,
                              local_size=c.local_size, local_scale=c.local_scale, min_overlap=c.min_overlap,
                              boxes=True, global_blur=(0.5, 0.5), global_solarize=(0.0, 0.0))

    def momentum(self, step: int) -> float:
        return cosine_schedule(step, self.cfg.momentum_teacher, 1.0, self.total_steps)

    def begin_step(self, step: int) -> dict[str, float]:
        return {"momentum": self.momentum(step)}

    def sorter(self, who: str, device: torch.device):
        """The student's or teacher's sorting network on ``device`` (built once; diffsort keeps its
        network matrices on one device)."""
        c = self.cfg
        steepness = c.student_steepness if who == "student" else c.teacher_steepness
        key = (steepness, str(device))
        if key not in self._sorters:
            self._sorters[key] = sorting_network(c.sort_net, c.roi_size ** 2, steepness, device)
        return self._sorters[key]

    def project(self, head: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """(n, N, D) backbone patches -> (n, N, proj_dim) L2-normalised projections, float32 at least."""
        projected = head(patches)
        return F.normalize(projected.to(torch.promote_types(projected.dtype, torch.float32)), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        frames = batch["global"].shape[2]
        # one frame per view: frame v % T (image mode: the only frame)
        views = [batch["global"][:, g, g % frames] for g in range(c.global_crops)]
        if c.local_crops:
            views += [batch["local"][:, l, l % frames] for l in range(c.local_crops)]
        B = views[0].shape[0]
        patch = self.student.patch_size
        grids = [v.shape[-1] / patch for v in views]  # crop side in patches, as the reference's box / patch size

        def maps(projected: torch.Tensor, count: int) -> list[torch.Tensor]:
            side = round(projected.shape[1] ** 0.5)  # (count*B, h*w, C) -> count maps (B, C, h, w)
            return list(projected.transpose(1, 2).unflatten(2, (side, side)).unflatten(0, (count, B)).unbind(0))

        global_images = torch.cat(views[:c.global_crops])
        student_maps = maps(self.project(self.student_head, self.student.forward_features(global_images)["patches"]),
                            c.global_crops)
        if c.local_crops:
            local = self.student.forward_features(torch.cat(views[c.global_crops:]))["patches"]
            student_maps += maps(self.project(self.student_head, local), c.local_crops)
        with torch.no_grad():
            out = self.teacher.net.forward_features(global_images, return_attention=c.loss_mask != "all")
            teacher_maps = maps(self.project(self.teacher_head.net, out["patches"]), c.global_crops)
            fg = None
            if c.loss_mask != "all":
                prefix = self.teacher.net.num_prefix_tokens
                cls_to_patches = out["attention"][:, :, 0, prefix:]
                fg = foreground_masks(cls_to_patches, teacher_maps[0].shape[-1]).unflatten(0, (c.global_crops, B))
                if c.loss_mask == "bg":
                    fg = 1 - fg
            if self.queues is not None:
                self.push_queues(teacher_maps, fg)

        queues = None
        if self.queues is not None:
            queues = [q.contents() if int(q.count) else None for q in self.queues]
        loss, stats = multicrop_neco_loss(
            teacher_maps, student_maps, batch["boxes"], batch["flip"], grids, roi_size=c.roi_size,
            distance=c.distance, references=c.references, student_sorter=self.sorter("student", views[0].device),
            teacher_sorter=self.sorter("teacher", views[0].device), fg=fg, queues=queues)
        # every pair skipped (empty fg masks): a zero that still reaches the student, so backward runs
        loss = loss + 0.0 * sum(m.sum() for m in student_maps)
        logs = {"feature_std": student_maps[0].detach().std(dim=(0, 2, 3)).mean(), **stats}
        return loss, logs

    @torch.no_grad()
    def push_queues(self, teacher_maps: list[torch.Tensor], fg: torch.Tensor | None) -> None:
        """Push random teacher patches of each global crop (foreground only with a mask) into its queue,
        before the loss reads it, as the reference does."""
        for g, queue in enumerate(self.queues):
            rows = teacher_maps[g].flatten(2).transpose(1, 2).flatten(0, 1)
            if fg is not None:
                rows = rows[fg[g].flatten().bool()]
            count = min(self.cfg.queue_rows_per_image * teacher_maps[g].shape[0], queue.size, len(rows))
            queue.push(rows[torch.randperm(len(rows), device=rows.device)[:count]])

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = self.momentum(step)
        for teacher, student in self.teacher_pairs():
            teacher.update(student, m)

    def backbone(self) -> nn.Module:
        return self.student  # the reference evaluates and releases the student

    def student_backbone(self) -> nn.Module:
        return self.student

    def teacher_pairs(self) -> list[tuple[EMATeacher, nn.Module]]:
        return [(self.teacher, self.student), (self.teacher_head, self.student_head)]
