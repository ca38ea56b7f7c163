"""SelfPatch's head (objectives.md §5.b): CaiT-style class attention on a CLS-free ViT's patches.

The head owns the CLS token. Two class-attention blocks summarise the patch tokens into it
(student, ``local=False``). For the teacher (``local=True``) each patch additionally gets its own
summary of its ``k_num`` most similar neighbours in a 3x3 window — the patch itself excluded —
which becomes that patch's target. Parameter names follow SelfPatch (``cls_token``,
``cls_blocks.N.attn.q``, ``norm``) so its checkpoints load.

Neighbourhoods wrap around the grid borders in SelfPatch's code (``wrap=True``); the paper
describes spatially adjacent patches, which ``wrap=False`` gives (border patches then have fewer
candidates; missing ones are masked out of the attention).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import attention, resolve_backend
from models.vit import Mlp


def neighbour_table(grid: tuple[int, int], kernel: int = 3, wrap: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (N, kernel² - 1) of each patch's neighbours in a kernel x kernel window (row-major
    token order, ascending per row) and a validity mask of the same shape (all True with ``wrap``)."""
    height, width = grid
    if wrap and (height < kernel or width < kernel):
        raise ValueError(f"a {height}x{width} grid is smaller than the {kernel}x{kernel} window: "
                         "wrapped neighbours would repeat")
    radius = kernel // 2
    offsets = torch.tensor([(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                            if (dy, dx) != (0, 0)])
    rows = torch.arange(height).repeat_interleave(width)[:, None] + offsets[:, 0]
    cols = torch.arange(width).repeat(height)[:, None] + offsets[:, 1]
    if wrap:
        valid = torch.ones_like(rows, dtype=torch.bool)
        rows, cols = rows % height, cols % width
    else:
        valid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
    index, order = (rows * width + cols).sort(dim=1)
    return index, valid.gather(1, order)


def most_similar_neighbours(x: torch.Tensor, grid: tuple[int, int], k: int, wrap: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's ``k`` most cosine-similar patches among its 8 neighbours (3x3 window, itself excluded).

    ``x`` (B, N, D) row-major patch tokens of an (h, w) ``grid``. Returns token indices (B, N, k),
    most similar first, and their validity (B, N, k): with ``wrap`` the window wraps around the
    borders (SelfPatch's code) and every pick is valid; without it a border patch has only its real
    neighbours (5 on an edge, 3 in a corner) and the picks beyond those are filler marked False.
    """
    index, valid = (t.to(x.device) for t in neighbour_table(grid, 3, wrap))
    unit = F.normalize(x, dim=-1)
    similarity = torch.einsum("bnkd,bnd->bnk", unit[:, index], unit).masked_fill(~valid, float("-inf"))
    best, order = similarity.topk(k, dim=-1)
    return index.expand(len(x), -1, -1).gather(2, order), best.isfinite()


class ClassAttention(nn.Module):
    """Attention of the first token (the CLS) over all tokens; returns the CLS update (B, 1, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (B, T, D) with the CLS first; ``key_mask`` (B, T) True where a key may be read."""
        batch, length, dim = tokens.shape
        heads = (self.num_heads, dim // self.num_heads)
        q = self.q(tokens[:, :1]).view(batch, 1, *heads)
        k, v = self.k(tokens).view(batch, length, *heads), self.v(tokens).view(batch, length, *heads)
        if key_mask is None:
            out = attention(q, k, v, resolve_backend("auto", tokens.device))
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=key_mask[:, None, None, :]).transpose(1, 2)
        return self.proj(out.reshape(batch, 1, dim))


class ClassAttentionBlock(nn.Module):
    """cls += CA(LN([cls; x])); cls += MLP(LN(cls)). The patch tokens are read, never updated."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, cls: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        cls = cls + self.attn(self.norm1(torch.cat([cls, x], dim=1)), key_mask)
        return cls + self.mlp(self.norm2(cls))


class SelfPatchHead(nn.Module):
    """Patch tokens (B, N, D) -> LN([cls; x]) (student) or LN([cls; neighbour summaries]) (teacher).

    Args:
        dim: token width.  num_heads: class-attention heads.  k_num: neighbours summarised per patch.
        depth: class-attention blocks (2 in SelfPatch).  wrap: wrap neighbourhoods around the borders.
    """

    def __init__(self, dim: int = 384, num_heads: int = 6, k_num: int = 4, depth: int = 2, wrap: bool = True):
        super().__init__()
        self.k_num, self.wrap = k_num, wrap
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_blocks = nn.ModuleList(ClassAttentionBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.cls_blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def summarise(self, x: torch.Tensor, cls: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.cls_blocks:
            cls = block(x, cls, key_mask)
        return cls

    def forward(self, x: torch.Tensor, local: bool = False, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``x`` (B, N, D) patch tokens in row-major order; ``grid`` (h, w) defaults to a square."""
        batch, patches, dim = x.shape
        cls = self.cls_token.expand(batch, -1, -1)
        summary = self.summarise(x, cls)
        if not local:
            return self.norm(torch.cat([summary, x], dim=1))
        if grid is None:
            side = math.isqrt(patches)
            if side * side != patches:
                raise ValueError(f"{patches} patches are not a square grid: pass grid=(h, w)")
            grid = (side, side)
        chosen, valid = most_similar_neighbours(x, grid, self.k_num, self.wrap)      # (B, N, k)
        neighbours = x[torch.arange(batch, device=x.device)[:, None, None], chosen]  # (B, N, k, D)
        key_mask = None
        if not self.wrap:  # a corner has 3 neighbours: never attend to the filler picks
            key_mask = torch.cat([valid.new_ones(batch, patches, 1), valid], dim=-1)
            key_mask = key_mask.flatten(0, 1)
        local_cls = self.summarise(neighbours.flatten(0, 1), cls[:1].expand(batch * patches, -1, -1), key_mask)
        return self.norm(torch.cat([summary, local_cls.view(batch, patches, dim)], dim=1))
