"""Random-weight checkpoints in the key layout of facebookresearch/dinov2's released files.

Written from the official model's parameter list (``dinov2/models/vision_transformer.py`` with
``block_chunks=0``, as ``dinov2_vits14_pretrain.pth`` and ``dinov2_vits14_reg4_pretrain.pth`` are
saved), not from densevid's model, so loading them checks the conversion rather than assuming it.
"""
import torch

WIDTHS = {"small": (384, 6), "base": (768, 12)}
OFFICIAL_NAMES = {("small", 0): "dinov2_vits14_pretrain.pth", ("small", 4): "dinov2_vits14_reg4_pretrain.pth",
                  ("base", 0): "dinov2_vitb14_pretrain.pth", ("base", 4): "dinov2_vitb14_reg4_pretrain.pth"}
TIMM_NAMES = {("small", 0): "vit_small_patch14_dinov2", ("small", 4): "vit_small_patch14_reg4_dinov2",
              ("base", 0): "vit_base_patch14_dinov2", ("base", 4): "vit_base_patch14_reg4_dinov2"}


def official_dinov2_state(size: str = "small", registers: int = 0, depth: int = 12, seed: int = 0
                          ) -> dict[str, torch.Tensor]:
    """A DINOv2 ViT-{S,B}/14 state dict (518-px grid: 37 x 37 positions + CLS) with random weights:
    small normal weights, LayerNorm scales near 1, LayerScale gammas in [0.1, 1] so the branches count."""
    dim, _ = WIDTHS[size]
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.02, mean=0.0):
        return mean + std * torch.randn(*shape, generator=generator)

    state = {"cls_token": normal(1, 1, dim), "pos_embed": normal(1, 1 + 37 * 37, dim),
             "mask_token": normal(1, dim), "patch_embed.proj.weight": normal(dim, 3, 14, 14),
             "patch_embed.proj.bias": normal(dim)}
    if registers:
        state["register_tokens"] = normal(1, registers, dim)
    for block in range(depth):
        prefix = f"blocks.{block}."
        for norm in ("norm1", "norm2"):
            state[prefix + f"{norm}.weight"] = normal(dim, std=0.1, mean=1.0)
            state[prefix + f"{norm}.bias"] = normal(dim)
        for name, (out_dim, in_dim) in {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim),
                                        "mlp.fc1": (4 * dim, dim), "mlp.fc2": (dim, 4 * dim)}.items():
            state[prefix + f"{name}.weight"] = normal(out_dim, in_dim)
            state[prefix + f"{name}.bias"] = normal(out_dim)
        for scale in ("ls1", "ls2"):
            state[prefix + f"{scale}.gamma"] = 0.1 + 0.9 * torch.rand(dim, generator=generator)
    state["norm.weight"] = normal(dim, std=0.1, mean=1.0)
    state["norm.bias"] = normal(dim)
    return state
