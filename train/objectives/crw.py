"""CRW: space-time correspondence as a contrastive random walk (Jabri et al., NeurIPS 2020).

Every frame of a clip is a graph of N patch nodes. A walker steps frame to frame along softmax
affinities, then walks back in time (a palindrome), and is trained to return to the node it started
from. The loss is the cross-entropy of that round trip against the identity.

Defaults follow the paper; three flags reproduce the released videowalk code (docs/objectives.md):
``dropout_shared`` (F1), ``min_walk_length=2`` (F3) and ``norm_stats="cifar"`` (F4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import models
from pipeline import GridViews
from pipeline.views import IMAGENET_MEAN, IMAGENET_STD
from train.objectives.base import Objective

# log(0) guard on the walk's return probability; matches videowalk, caps -log at ~46 (F8).
RETURN_EPS = 1e-20
# Value written into dropped affinities before the softmax: their edges get exactly zero weight.
DROPPED_AFFINITY = -1e20
NORM_STATS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}


def crw_loss(
    nodes: torch.Tensor,
    temperature: float,
    edge_dropout: float = 0.0,
    *,
    min_walk_length: int = 1,
    dropout_shared: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cycle-consistency cross-entropy of the palindrome walks of a clip.

    Args:
        nodes: (B, T, N, C) node embeddings, L2-normalised over C.
        temperature: softmax temperature of the transition matrices.
        edge_dropout: probability of dropping each edge (set to -inf before the softmax).
        min_walk_length: shortest walk (steps each way); walks of length min..T-1 are averaged.
            The paper trains every length from 1; videowalk's code starts at 2 (F3).
        dropout_shared: videowalk's in-place dropout, where the backward matrix of a step inherits
            the edges dropped in its forward matrix before drawing its own (F1). Off: independent.
        generator: source of the dropout noise (the global torch RNG when None).

    Returns:
        (loss, logs) with per-walk-length ``xent_k{k}`` and return accuracy ``acc_k{k}``.

    Noise is drawn as videowalk draws it: all forward masks (T-1, B, N, N), then all backward masks
    in the same row-major order and transposed (F2), so a seeded run reproduces the reference.
    """
    batch, frames, num_nodes, _ = nodes.shape
    if not 1 <= min_walk_length <= frames - 1:
        raise ValueError(f"min_walk_length={min_walk_length} needs 1 <= it <= T-1 = {frames - 1}")
    # Products of up to 2(T-1) stochastic matrices underflow in bf16: keep the walk in float32.
    with torch.autocast(nodes.device.type, enabled=False):
        nodes = nodes.to(torch.promote_types(nodes.dtype, torch.float32))
        affinity = torch.einsum("btnc,btmc->btnm", nodes[:, :-1], nodes[:, 1:])  # (B, T-1, N, N)
        forward_aff, backward_aff = affinity, affinity.transpose(-1, -2)
        if edge_dropout > 0:
            noise_shape = (frames - 1, batch, num_nodes, num_nodes)
            opts = dict(device=nodes.device, generator=generator)
            drop_fwd = (torch.rand(noise_shape, **opts) < edge_dropout).transpose(0, 1)
            drop_bwd = (torch.rand(noise_shape, **opts) < edge_dropout).transpose(0, 1).transpose(-1, -2)
            if dropout_shared:
                drop_bwd = drop_bwd | drop_fwd.transpose(-1, -2)
            forward_aff = forward_aff.masked_fill(drop_fwd, DROPPED_AFFINITY)
            backward_aff = backward_aff.masked_fill(drop_bwd, DROPPED_AFFINITY)
        step_fwd = F.softmax(forward_aff / temperature, dim=-1)   # t -> t+1
        step_bwd = F.softmax(backward_aff / temperature, dim=-1)  # t+1 -> t

        logs: dict[str, torch.Tensor] = {}
        losses = []
        outbound = step_fwd[:, 0]
        for length in range(1, frames):
            if length > 1:
                outbound = outbound @ step_fwd[:, length - 1]
            if length < min_walk_length:
                continue
            walk = outbound
            for t in reversed(range(length)):  # left to right, as the reference multiplies
                walk = walk @ step_bwd[:, t]
            returned = walk.diagonal(dim1=-2, dim2=-1)  # (B, N): probability of coming home
            xent = -torch.log(returned + RETURN_EPS).mean()
            losses.append(xent)
            logs[f"xent_k{length}"] = xent.detach()
            hits = walk.argmax(-1) == torch.arange(num_nodes, device=walk.device)
            logs[f"acc_k{length}"] = hits.float().mean()
        return torch.stack(losses).mean(), logs


@dataclass
class CRWConfig:
    """Knobs of the contrastive random walk (defaults: paper / videowalk README command)."""

    temperature: float = 0.05
    """Softmax temperature of the transitions (README 0.05; argparse default 0.07)."""
    edge_dropout: float = 0.1
    """Edge dropout rate of the transition matrices."""
    dropout_shared: bool = False
    """True reproduces videowalk's shared in-place dropout (F1); False draws independent masks."""
    min_walk_length: int = 1
    """Shortest palindrome trained: 1 as in the paper; 2 reproduces the code (F3)."""
    norm_stats: Literal["imagenet", "cifar"] = "imagenet"
    """Input normalisation: ImageNet as at test time; "cifar" reproduces the training code (F4)."""
    clip_len: int = 4
    """Frames per clip T."""
    frame_stride: int = 4
    """Gap between the clip's frames, in packed frames. videowalk walks at 8 fps; at the packer's
    default 30 fps, 4 gives 7.5 fps."""
    size: int = 256
    """Side of the frame crop the patch grid is cut from."""
    crop_scale: tuple[float, float] = (0.8, 0.95)
    """Area range of the per-clip random-resized crop."""
    crop_ratio: tuple[float, float] = (0.7, 1.3)
    """Aspect-ratio range of that crop."""
    patch_size: int = 64
    """Side of a node's patch."""
    patch_stride: int = 32
    """Stride of the patch grid (49 nodes for 256 / 64 / 32)."""
    patch_scale: tuple[float, float] = (0.7, 0.9)
    """Area range of the per-patch spatial jitter."""
    embed_dim: int = 128
    """Node embedding size after the head."""
    head_depth: int = 0
    """Hidden Linear+ReLU layers before the final projection (0: one Linear)."""


class CRW(Objective):
    """Encoder -> spatially pooled patch features -> linear head -> unit node embeddings -> walk."""

    Config = CRWConfig
    default_arch = "resnet18_crw"

    def __init__(self, cfg: CRWConfig, arch: str, drop_path: float = 0.0, *,
                 total_steps: int, steps_per_epoch: int) -> None:
        super().__init__()  # CRW has no step-scheduled state: the two counts go unused
        self.cfg, self.arch = cfg, arch
        if arch.startswith("vit"):
            self.encoder = models.build(arch, drop_path=drop_path)
            width = self.encoder.embed_dim
        else:
            if drop_path:
                raise ValueError(f"model.drop_path={drop_path}: {arch} has no stochastic depth; set it to 0")
            self.encoder = models.build(arch)
            width = self.encoder.out_channels
        layers: list[nn.Module] = []
        for _ in range(cfg.head_depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.head = nn.Sequential(*layers, nn.Linear(width, cfg.embed_dim))

    def views(self) -> GridViews:
        mean, std = NORM_STATS[self.cfg.norm_stats]
        return GridViews(
            frames=self.cfg.clip_len, stride=self.cfg.frame_stride,
            size=self.cfg.size, scale=self.cfg.crop_scale, ratio=self.cfg.crop_ratio, flip=False, color=False,
            patch_size=self.cfg.patch_size, patch_stride=self.cfg.patch_stride,
            patch_scale=self.cfg.patch_scale, mean=mean, std=std,
        )

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, T, N, 3, P, P) patches -> (B, T, N, C) unit node embeddings."""
        lead = patches.shape[:3]
        flat = patches.flatten(0, 2)
        if self.arch.startswith("vit"):
            pooled = self.encoder.forward_features(flat)["patches"].mean(1)
        else:
            pooled = self.encoder(flat).mean((-2, -1))
        return F.normalize(self.head(pooled), dim=-1).unflatten(0, lead)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nodes = self.embed(batch["patches"])
        loss, logs = crw_loss(
            nodes, self.cfg.temperature, self.cfg.edge_dropout if self.training else 0.0,
            min_walk_length=self.cfg.min_walk_length, dropout_shared=self.cfg.dropout_shared,
        )
        # Collapse monitor: node embeddings that stop varying across patches make every walk uniform.
        logs["node_std"] = nodes.detach().float().std(dim=2).mean()
        return loss, logs

    def backbone(self) -> nn.Module:
        return self.encoder

    def student_backbone(self) -> nn.Module:
        return self.encoder
