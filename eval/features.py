"""Backbones for evaluation: load one from a run, an export or an official checkpoint, and turn frames
into dense L2-normalised feature maps or global descriptors; and, for SMTC runs, find the exported slot
head and run it over a video."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from eval.propagation_config import IMAGENET_MEAN, IMAGENET_STD

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, H, W, 3) -> float (B, D, h, w)
SLOTS_FILE = "slots.safetensors"  # SMTC's slot head, exported beside backbone.safetensors (train/checkpoint.py)
SLOT_OUTPUTS = ("semantic_logits", "semantic_slots", "instance_slots", "instance_logits")


def load_backbone(ckpt: str | Path, arch: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """A run directory (its ``backbone.safetensors``), an exported ``.safetensors``, or an official
    DINO / timm / CRW checkpoint (``arch`` overrides the architecture inferred from the weights)."""
    from models.io import load_backbone as load_weights_file

    path = Path(ckpt)
    if path.is_dir():
        path = path / "backbone.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} has no backbone.safetensors: pass a run directory written by "
                                    "train/run.py (it exports one at every checkpoint) or a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (expected a run directory, .safetensors or .pth)")
    backbone = load_weights_file(path, arch=arch, trust_pickle=trust_pickle).eval()
    if "layer4" in getattr(backbone, "stages", ()):
        # CRW's protocol: layer4 (and the head) serve the training walk only; propagation and probes
        # read layer3 (256 channels, stride 8), as videowalk's test.py does.
        backbone.remove_layers(["layer4"])
    return backbone


def normalise_frames(frames: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised."""
    x = frames.permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def dense_features(backbone: nn.Module, layer: int = 1, upsample: int = 1, final_norm: bool | None = None
                   ) -> FeatureFn:
    """Normalised float frames (B, 3, H, W) -> (B, D, h, w) L2-normalised features. ViTs: output of the
    ``layer``-th block from the end after the final LayerNorm, CLS and registers dropped (DINO's protocol), or
    before it when ``final_norm`` is False, or when it is None and the backbone was built with
    ``dense_norm=False`` (SMTC's and SelfPatch's protocols; recorded in their exports);
    CNN encoders (``out_channels``): their map. ``upsample`` > 1 bilinearly enlarges the map by that factor
    before the L2 normalisation (SMTC's stride-16 -> 8 setting B), so the cells are ``stride / upsample`` pixels."""

    @torch.inference_mode()
    def features(x: torch.Tensor) -> torch.Tensor:
        if hasattr(backbone, "get_intermediate_layers"):
            norm = getattr(backbone, "dense_norm", True) if final_norm is None else final_norm
            tokens = backbone.get_intermediate_layers(x, n=layer, norm=norm)[0]
            patch = backbone.patch_size
            h, w = x.shape[-2] // patch, x.shape[-1] // patch
            tokens = tokens[:, backbone.num_prefix_tokens:]  # drop CLS (DINO's protocol) and any registers
            fmap = tokens.transpose(1, 2).reshape(len(x), -1, h, w)
        else:
            fmap = backbone(x)
        if upsample > 1:
            fmap = F.interpolate(fmap.float(), scale_factor=upsample, mode="bilinear", align_corners=False)
        return F.normalize(fmap.float(), dim=1)

    return features


def dense_feature_fn(backbone: nn.Module, layer: int = 1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     upsample: int = 1) -> FeatureFn:
    """uint8 frames (B, H, W, 3) -> :func:`dense_features` of the frames normalised with ``mean`` and ``std``."""
    features = dense_features(backbone, layer, upsample)
    return lambda frames: features(normalise_frames(frames, mean, std))


def pads_to_cover_frame(backbone: nn.Module) -> bool:
    """Whether the backbone's feature grid covers the whole frame at any size: CNN encoders (padded
    convolutions give ceil(size / stride) cells, as videowalk's test.py relies on), unlike ViTs and pixel
    cells, which drop the remainder of a size that is not a multiple of their patch."""
    return hasattr(backbone, "out_channels") and not hasattr(backbone, "get_intermediate_layers")


def feature_stride(backbone: nn.Module) -> int:
    """Pixels per feature cell: the ViT patch size (or pixel cell side), or 8 for the CRW ResNet encoder."""
    return int(getattr(backbone, "patch_size", 8))


class PixelCells(nn.Module):
    """Raw pixels as features: each ``cell`` x ``cell`` block of the normalised frame, flattened to a
    3 * cell^2 vector (B, 3, H, W) -> (B, 3 * cell^2, H / cell, W / cell). The baseline a learned
    backbone has to beat; with ``cell`` 8 its grid is that of the CRW ResNet (stride 8)."""

    def __init__(self, cell: int = 8):
        super().__init__()
        self.patch_size = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cell = self.patch_size
        h, w = x.shape[-2] // cell, x.shape[-1] // cell
        return F.unfold(x[..., :h * cell, :w * cell], cell, stride=cell).unflatten(-1, (h, w))


@torch.inference_mode()
def global_descriptor(backbone: nn.Module, images: torch.Tensor, n_last_blocks: int = 1,
                      avgpool: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, D') image descriptor: CLS tokens of the last ``n_last_blocks`` blocks
    (after the final norm) concatenated, plus the mean patch token when ``avgpool`` (DINO eval_linear;
    registers are not patches);
    CNNs: global average pool."""
    x = normalise_frames(images)
    if not hasattr(backbone, "get_intermediate_layers"):
        return backbone(x).float().mean(dim=(-2, -1))
    blocks = backbone.get_intermediate_layers(x, n=n_last_blocks, norm=True)
    parts = [block[:, 0] for block in blocks]
    if avgpool:
        parts.append(blocks[-1][:, backbone.num_prefix_tokens:].mean(dim=1))  # patches only, no registers
    return torch.cat(parts, dim=-1).float()


def slot_export(ckpt: str | Path | None) -> Path | None:
    """The slot head exported beside the backbone of a run, checkpoint or ``init/`` folder (SMTC runs), else None."""
    path = Path(ckpt) / SLOTS_FILE if ckpt else None
    return path if path is not None and path.is_file() else None


def clip_starts(frames: int, clip_len: int) -> list[int]:
    """First frames of the clips of ``min(clip_len, frames)`` consecutive frames that cover a video: back to
    back, the last one moved back to end at the last frame (so it may overlap the one before)."""
    length = min(clip_len, frames)
    starts = list(range(0, frames - length + 1, length))
    if starts[-1] + length < frames:
        starts.append(frames - length)
    return starts


@torch.inference_mode()
def video_slots(network: nn.Module, frames: torch.Tensor, clip_len: int, noise: torch.Tensor,
                clips_per_forward: int = 1) -> dict[str, torch.Tensor]:
    """uint8 (T, H, W, 3) frames of one video -> ``models.slots.SMTCSlots`` outputs per frame: ``SLOT_OUTPUTS``
    as (T, ...) float32 tensors on the CPU.

    The network sees clips of ``clip_len`` consecutive frames (:func:`clip_starts`), since its correlation
    injection pairs every frame with a neighbour of its clip; frames an overlapping last clip repeats are
    taken from the clip before. (SMTC's script pads its last window with repeated frames instead, so its
    last frames can be paired with themselves.) ``noise`` (S, P, D), standard normal, is the instance
    draw of every frame: instance p of slot s starts from the same point in all of them, which is what
    makes (s, p) one proposal through the video.
    """
    device = next(network.parameters()).device
    starts = clip_starts(len(frames), clip_len)
    length = min(clip_len, len(frames))
    instance_init = network.slot_attention.instances_from_noise(noise.to(device))    # (1, S, P, D)
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in SLOT_OUTPUTS}
    covered = 0
    for first in range(0, len(starts), clips_per_forward):
        group = starts[first:first + clips_per_forward]
        clips = torch.stack([frames[start:start + length] for start in group]).to(device)   # (B, L, H, W, 3)
        x = normalise_frames(clips.flatten(0, 1)).unflatten(0, clips.shape[:2])
        out = network(x, instance_init.expand(x.shape[0] * length, -1, -1, -1))
        for index, start in enumerate(group):
            for name in SLOT_OUTPUTS:
                kept[name].append(out[name][index, covered - start:].float().cpu())
            covered = start + length
    return {name: torch.cat(parts) for name, parts in kept.items()}
