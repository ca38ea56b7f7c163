"""Vision Transformer (ViT-Ti/S/B, patch 8, 14 or 16; DINOv2's LayerScale and registers) for dense SSL.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``, ``norm``), so
official DINO checkpoints and timm state dicts load without renaming (see ``models.io``).

What the objectives need beyond a classifier ViT (objectives.md §0.1):
* any input size: positional embeddings are interpolated to the token grid (non-square, 480p);
* the last block's exact attention maps per head and its queries (DoRA) and keys (DoRA, SMTC),
  while every other block keeps the memory-efficient kernel;
* patch tokens with or without the final LayerNorm (SMTC and SelfPatch read them un-normed);
* an optional CLS token and an optional final LayerNorm (SelfPatch's backbone has neither);
* DINOv2's variants (``vit_dinov2``): LayerScale on both residual branches, optional register tokens
  (stored as timm does: ``reg_token``, and no positional embedding for the prefix tokens, the CLS
  position folded into ``cls_token``), a 518-px native grid (37 x 37 patches of 14) and the official
  repository's interpolation of that grid to other sizes (see ``resize_pos_embed``).

Token order is always ``[CLS, registers..., patches]``: the CLS stays at index 0 and patch tokens start
at ``num_prefix_tokens`` (1 + registers), so every consumer that slices with ``num_prefix_tokens``
excludes the registers from patch features.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import attention, attention_maps, check_backend, resolve_backend

# name -> (embed_dim, depth, num_heads); MLP ratio 4, qkv bias, LayerNorm eps 1e-6 for all.
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


POS_INTERPOLATIONS = ("offset", "antialias")


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1,
                     mode: str = "offset") -> torch.Tensor:
    """Bicubically resize the patch part of (1, prefix + n*n, D) positional embeddings to ``grid``.

    Identity when the grid already matches. Computed in float32 and cast back. Two rules, as the
    official code of each model family does it:

    * ``"offset"``: DINO's interpolation (a scale factor of (out + 0.1) / n, with the factor, not the
      size, mapping coordinates; no antialiasing), which every reference repository in objectives.md
      inherits and which DINOv2 keeps for its models without registers (``interpolate_offset=0.1``),
      so those checkpoints give their published features at 480p;
    * ``"antialias"``: the exact output size, antialiased bicubic: DINOv2 with registers
      (``interpolate_antialias=True, interpolate_offset=0``) and timm's ``resample_abs_pos_embed``.
    """
    if mode not in POS_INTERPOLATIONS:
        raise ValueError(f"unknown positional-embedding interpolation {mode!r}; choose one of {POS_INTERPOLATIONS}")
    n_patch = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(n_patch)
    if side * side != n_patch:
        raise ValueError(f"positional embedding has {n_patch} patch positions, not a square grid")
    if grid == (side, side):
        return pos_embed
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    patch = patch.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    if mode == "offset":
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False)
    else:
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False, antialias=True)
    assert patch.shape[-2:] == grid, (patch.shape, grid)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, through one strided convolution (``patch_embed.proj``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        height, width = x.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {p}: "
                             f"resize or crop frames to multiples of {p} first")
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and a switchable kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v as (B, N, heads, d) views of one projection (no copies)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        return qkv.unbind(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        out = attention(q, k, v, resolve_backend(self.backend, x.device))
        return self.proj(out.flatten(2))

    def forward_with_maps(self, x: torch.Tensor, return_attention: bool, return_keys: bool,
                          return_queries: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Like ``forward`` and also the exact float32 maps (B, heads, N, N), keys and queries
        (B, heads, N, d; unscaled, as projected).

        Only asking for maps materialises the N x N matrix; keys or queries alone keep the fast kernel.
        """
        q, k, v = self._qkv(x)
        keys = k.transpose(1, 2) if return_keys else None
        queries = q.transpose(1, 2) if return_queries else None
        if not return_attention:
            out = attention(q, k, v, resolve_backend(self.backend, x.device))
            return self.proj(out.flatten(2)), None, keys, queries
        probs = attention_maps(q.transpose(1, 2), k.transpose(1, 2))
        out = (probs.to(v.dtype) @ v.transpose(1, 2)).transpose(1, 2)
        return self.proj(out.flatten(2)), probs, keys, queries


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU -> Linear (``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (CaiT; DINOv2's ``ls1`` / ``ls2``, key ``gamma``)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches, and LayerScale on
    them when ``layer_scale`` (its initial value) is given."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, attn: str = "auto", layer_scale: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)

    def forward_with_maps(self, x: torch.Tensor, return_attention: bool, return_keys: bool,
                          return_queries: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        y, probs, keys, queries = self.attn.forward_with_maps(self.norm1(x), return_attention, return_keys,
                                                              return_queries)
        x = x + drop_path(self.ls1(y), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training), probs, keys, queries


class VisionTransformer(nn.Module):
    """ViT backbone returning dense features; see ``forward_features`` for the output contract.

    Args:
        img_size: side of the native (pretraining) resolution; sets the stored positional grid.
        patch_size: 8, 14 or 16 (any divisor of the input works).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the usual ViT shape.
        drop_path: stochastic-depth rate of the last block, rising linearly from 0 in block 0.
        attn: attention kernel, ``"auto" | "xformers" | "sdpa" | "math"``.
        class_token: prepend a learned CLS token (False for SelfPatch's CaiT-style backbone).
        final_norm: end with a LayerNorm (``norm``). SelfPatch's backbone has none (its head owns
            the norm): without it ``norm`` is an identity, so "normed" features are the raw tokens.
        grad_checkpointing: recompute each block in the backward pass instead of storing its
            activations (training memory for compute; also settable later as an attribute).
        layer_scale: initial value of LayerScale on both residual branches of every block (DINOv2:
            1e-5); None: no LayerScale.
        reg_tokens: learned register tokens inserted after the CLS token (DINOv2-reg: 4). They attend
            and are attended to like any token, but are never returned as patch features.
        no_embed_class: the positional embedding covers the patches only; the prefix tokens (CLS,
            registers) get none (timm's layout of DINOv2-reg, whose CLS position is folded into
            ``cls_token``).
        pos_interpolation: how the stored grid is resized to other inputs, ``"offset"`` (DINO, DINOv2
            without registers) or ``"antialias"`` (DINOv2 with registers, timm); see
            :func:`resize_pos_embed`.
        dense_norm: whether the dense features evaluation reads pass the final LayerNorm (DINO's
            protocol); False for backbones trained and evaluated on un-normed last-block tokens
            (SMTC). Recorded in exports, so ``eval/`` reads a run's features as it was trained.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, attn: str = "auto", class_token: bool = True,
                 final_norm: bool = True, grad_checkpointing: bool = False, layer_scale: float | None = None,
                 reg_tokens: int = 0,
                 no_embed_class: bool = False, pos_interpolation: str = "offset",
                 dense_norm: bool = True):
        super().__init__()
        if pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"unknown pos_interpolation {pos_interpolation!r}; choose one of {POS_INTERPOLATIONS}")
        if reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
        self.embed_dim = embed_dim
        self.dense_norm = dense_norm
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        # prefix tokens that have an entry in pos_embed
        self.num_pos_prefix_tokens = 0 if no_embed_class else self.num_prefix_tokens
        self.pos_interpolation = pos_interpolation
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        num_patches = (img_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_pos_prefix_tokens + num_patches, embed_dim))
        rates = [drop_path * index / max(depth - 1, 1) for index in range(depth)]  # linear in depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, attn, layer_scale) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DINO/timm initialisation: truncated normal (std 0.02) for linears and embeddings; registers
        as DINOv2 (normal, std 1e-6); LayerScale at its initial value."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                module.reset_parameters()

    def set_attention_backend(self, attn: str) -> None:
        """Switch every block to another attention kernel (weights are unchanged)."""
        for block in self.blocks:
            block.attn.backend = check_backend(attn)

    def prepare_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) -> tokens (B, prefix + h*w, D) ``[CLS, registers, patches]`` with
        positions added, and (h, w)."""
        tokens, grid = self.patch_embed(x)
        prefix = [token.expand(tokens.shape[0], -1, -1) for token in (self.cls_token, self.reg_token)
                  if token is not None]
        pos_embed = resize_pos_embed(self.pos_embed, grid, self.num_pos_prefix_tokens, self.pos_interpolation)
        if self.num_pos_prefix_tokens == 0:  # the prefix has no positions: add, then prepend
            return torch.cat([*prefix, tokens + pos_embed], dim=1), grid
        return torch.cat([*prefix, tokens], dim=1) + pos_embed, grid

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: torch.Tensor, norm: bool = True, return_attention: bool = False,
                         return_keys: bool = False, return_queries: bool = False) -> dict:
        """Dense features of images (B, 3, H, W), H and W multiples of the patch size.

        Returns a dict: ``cls`` (B, D) (absent without a class token), ``patches`` (B, h*w, D) (never
        the registers), ``registers`` (B, R, D) (only with register tokens), ``grid`` (h, w), and on
        request the last block's ``attention`` (B, heads, T, T) — exact softmax maps — ``keys`` and
        ``queries`` (B, heads, T, d), over all T = prefix + h*w tokens in the order CLS, registers, patches (the
        patch columns are ``[..., num_prefix_tokens:]``). ``norm`` applies the final LayerNorm to
        ``cls``, ``registers`` and ``patches``.
        """
        tokens, grid = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            tokens = self._run_block(block, tokens)
        last = self.blocks[-1]
        probs = keys = queries = None
        if return_attention or return_keys or return_queries:
            tokens, probs, keys, queries = last.forward_with_maps(tokens, return_attention, return_keys,
                                                                  return_queries)
        else:
            tokens = self._run_block(last, tokens)
        if norm:
            tokens = self.norm(tokens)
        out = {"patches": tokens[:, self.num_prefix_tokens:], "grid": grid}
        if self.cls_token is not None:
            out["cls"] = tokens[:, 0]
        if self.reg_token is not None:
            out["registers"] = tokens[:, self.num_prefix_tokens - self.num_reg_tokens:self.num_prefix_tokens]
        if return_attention:
            out["attention"] = probs
        if return_keys:
            out["keys"] = keys
        if return_queries:
            out["queries"] = queries
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding (B, D): the normed CLS token, or mean normed patch token without one."""
        out = self.forward_features(x)
        return out["cls"] if self.cls_token is not None else out["patches"].mean(dim=1)

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, norm: bool = True
                                ) -> list[torch.Tensor]:
        """Token outputs (B, prefix + h*w, D) of the last ``n`` blocks (or of the block indices in
        ``n``), in block order; ``norm`` applies the final LayerNorm to each (as DINO does). Patch
        tokens are ``[:, num_prefix_tokens:]`` (CLS at 0, then any registers)."""
        depth = len(self.blocks)
        if isinstance(n, int) and not 1 <= n <= depth:
            raise ValueError(f"n={n} must be between 1 and the depth {depth}")
        wanted = set(range(depth - n, depth)) if isinstance(n, int) else {i % depth for i in n}
        tokens, _ = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks[:max(wanted) + 1]):
            tokens = self._run_block(block, tokens)
            if index in wanted:
                outputs.append(self.norm(tokens) if norm else tokens)
        return outputs


def vit(size: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
    """A ViT of a named size (``tiny | small | base``); ``kwargs`` go to :class:`VisionTransformer` and
    may override the size's shape (``depth=2`` for a shallow copy in tests)."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
    embed_dim, depth, num_heads = VIT_SIZES[size]
    shape = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    return VisionTransformer(patch_size=patch_size, **{**shape, **kwargs})


def vit_dinov2(size: str, reg_tokens: int = 0, **kwargs) -> VisionTransformer:
    """DINOv2's ViT-S/14 or B/14 (timm's ``vit_{size}_patch14[_reg4]_dinov2``): a 518-px native grid
    (37 x 37 patches), LayerScale (initialised at 1e-5, as DINOv2's training and timm do), and
    ``reg_tokens`` registers. The positional grid is resized as the official hub models do it: DINO's
    offset rule without registers, antialiased bicubic with them. ``kwargs`` override any of these
    (e.g. ``img_size=224`` to store a 16 x 16 grid) and go to :class:`VisionTransformer`.
    """
    defaults = {"img_size": 518, "layer_scale": 1e-5, "reg_tokens": reg_tokens, "no_embed_class": reg_tokens > 0,
                "pos_interpolation": "antialias" if reg_tokens else "offset"}
    return vit(size, 14, **{**defaults, **kwargs})
