"""Random-weight checkpoints in the layouts the reference evaluation scripts load, drawn from numpy's PCG64
stream (bit-stable across machines, unlike torch's vectorised CPU normal sampler), so that a test can
rebuild exactly the weights a reference script was once run with (tests/eval/test_reference_masks.py).

* ``dino_vit_tiny16_state``: facebookresearch/dino ``vision_transformer.vit_tiny(patch_size=16,
  num_classes=0)``'s state dict, as ``dino_deitsmall16_pretrain.pth`` stores ViT-S/16 (224-px grid).
* ``crw_checkpoint``: ajabri/videowalk's ``{"model": CRW.state_dict()}`` for ``--model-type scratch``
  (ResNet-18 under ``encoder.model.``), as its ``pretrained.pth``; test.py drops ``layer4`` and the head.
"""
import numpy as np
import torch

VIT_TINY_DIM, VIT_DEPTH, VIT_GRID = 192, 12, 14


def _normal(rng: np.random.Generator, shape, std: float, mean: float = 0.0) -> torch.Tensor:
    return torch.from_numpy((mean + std * rng.standard_normal(shape)).astype(np.float32))


def dino_vit_tiny16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """ViT-Ti/16 in DINO's key layout: normal(0.02) weights and biases, LayerNorm scales near 1."""
    rng = np.random.default_rng(seed)
    dim = VIT_TINY_DIM
    state = {"cls_token": _normal(rng, (1, 1, dim), 0.02), "pos_embed": _normal(rng, (1, 1 + VIT_GRID ** 2, dim), 0.02),
             "patch_embed.proj.weight": _normal(rng, (dim, 3, 16, 16), 0.02),
             "patch_embed.proj.bias": _normal(rng, (dim,), 0.02)}
    for block in range(VIT_DEPTH):
        prefix = f"blocks.{block}."
        for norm in ("norm1", "norm2"):
            state[prefix + f"{norm}.weight"] = _normal(rng, (dim,), 0.1, 1.0)
            state[prefix + f"{norm}.bias"] = _normal(rng, (dim,), 0.02)
        for name, (out_dim, in_dim) in {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim),
                                        "mlp.fc1": (4 * dim, dim), "mlp.fc2": (dim, 4 * dim)}.items():
            state[prefix + f"{name}.weight"] = _normal(rng, (out_dim, in_dim), 0.02)
            state[prefix + f"{name}.bias"] = _normal(rng, (out_dim,), 0.02)
    state["norm.weight"] = _normal(rng, (dim,), 0.1, 1.0)
    state["norm.bias"] = _normal(rng, (dim,), 0.02)
    return state


def _resnet18_state(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The ResNet-18 keys of videowalk's encoder (torchvision's, without the classifier): He-normal
    convolutions, BatchNorm scales near 1 with the running statistics of a unit Gaussian."""
    state = {}

    def conv(name, out_ch, in_ch, k):
        state[f"{name}.weight"] = _normal(rng, (out_ch, in_ch, k, k), (2.0 / (in_ch * k * k)) ** 0.5)

    def batchnorm(name, ch):
        state[f"{name}.weight"] = _normal(rng, (ch,), 0.1, 1.0)
        state[f"{name}.bias"] = _normal(rng, (ch,), 0.1)
        state[f"{name}.running_mean"] = torch.zeros(ch)
        state[f"{name}.running_var"] = torch.ones(ch)
        state[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("conv1", 64, 3, 7)
    batchnorm("bn1", 64)
    in_ch = 64
    for layer, out_ch in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            first_in = in_ch if block == 0 else out_ch
            conv(f"{prefix}.conv1", out_ch, first_in, 3)
            batchnorm(f"{prefix}.bn1", out_ch)
            conv(f"{prefix}.conv2", out_ch, out_ch, 3)
            batchnorm(f"{prefix}.bn2", out_ch)
            if block == 0 and layer > 1:
                conv(f"{prefix}.downsample.0", out_ch, first_in, 1)
                batchnorm(f"{prefix}.downsample.1", out_ch)
        in_ch = out_ch
    return state


def crw_checkpoint(seed: int = 0) -> dict:
    """``{"model": ...}`` with the ResNet-18 under ``encoder.model.`` and the 512 -> 128 head of a trained
    run (``--head-depth 0``; test.py skips it)."""
    rng = np.random.default_rng(seed)
    model = {f"encoder.model.{k}": v for k, v in _resnet18_state(rng).items()}
    model["selfsim_fc.0.weight"] = _normal(rng, (128, 512), 0.02)
    model["selfsim_fc.0.bias"] = torch.zeros(128)
    return {"model": model}
