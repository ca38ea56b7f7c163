"""Checkpoint import and export for backbones.

Reads: our exports (safetensors with ``arch``/``kwargs`` metadata), official DINO checkpoints
(plain backbone state dicts, or full training checkpoints with ``student``/``teacher`` and
``module.``/``backbone.`` prefixes), timm ViT state dicts, CRW (videowalk) checkpoints, and the
same formats written by DoRA/SMTC/TimeT (``encoder.`` prefixes). Writes: a backbone as a safetensors
file with timm key names, loadable by ``timm.models.vision_transformer.VisionTransformer`` as is.

Pickled checkpoints are read with ``torch.load(weights_only=True)``: no code in a checkpoint runs
unless the caller passes ``trust_pickle=True``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from models.registry import build
from models.vit import VIT_SIZES, VisionTransformer, resize_pos_embed

log = logging.getLogger(__name__)

EXPORT_FORMAT = "densevid-backbone-v1"
# Wrappers that prefix backbone keys: DDP, torch.compile, our EMA teachers (train/teacher.py), DINO's
# MultiCropWrapper, SMTC/CRW encoders.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.", "backbone.", "encoder.model.", "encoder.", "model.")
# Constructor arguments that change how a model runs, not its weights: not written into exports.
RUNTIME_KWARGS = ("attn", "drop_path", "grad_checkpointing")
# Top-level checkpoint entries a backbone does not use: classifiers and masked-modelling tokens.
# Any other entry the model lacks means a different architecture and is refused.
SKIPPABLE_MODULES = {"head", "fc_norm", "fc", "mask_token"}
# Nested dicts that hold the weights in training checkpoints.
CHECKPOINT_KEYS = ("model", "state_dict", "model_state")


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[dict, dict[str, str]]:
    """Read a checkpoint file into (contents, safetensors metadata or {})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    try:
        if trust_pickle:
            contents = torch.load(path, map_location="cpu", weights_only=False)
        else:  # argparse.Namespace is plain data; DINO stores its arguments as one in every checkpoint
            with torch.serialization.safe_globals([argparse.Namespace]):
                contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only met a global it may not build
        raise RuntimeError(
            f"{path} holds pickled Python objects beyond tensors ({str(error).splitlines()[0]}). "
            "Loading them can run arbitrary code: if you trust this file, pass trust_pickle=True "
            "(--trust-pickle on the command line)") from error
    except Exception as error:  # truncated download, not a torch file, ...
        raise RuntimeError(f"{path} is not a readable torch checkpoint: {error}") from error
    if isinstance(contents, nn.Module):  # a whole pickled model (only possible with trust_pickle)
        contents = contents.state_dict()
    if not isinstance(contents, dict):
        raise RuntimeError(f"{path} holds a {type(contents).__name__}, not a state dict or checkpoint dict")
    return contents, {}


def backbone_state_dict(checkpoint: dict, which: str = "teacher") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Find the backbone weights in a checkpoint; return them (wrapper prefixes stripped) and the
    names of the entries left out (heads, optimizer state, ...), so callers can report them."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', not {which!r}")
    ignored: list[str] = []
    state = checkpoint
    if which in state and isinstance(state[which], dict):
        ignored += [key for key in state if key != which]
        state = state[which]
    else:
        for key in CHECKPOINT_KEYS:
            if isinstance(state.get(key), dict):
                ignored += [name for name in state if name != key]
                state = state[key]
                break
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    ignored += [key for key in state if key not in tensors]
    # In order, outer wrappers first; "teacher."/"student." are flat training states (our objectives).
    for prefix in (*WRAPPER_PREFIXES[:2], f"{which}.", *WRAPPER_PREFIXES[2:]):
        if any(key.startswith(prefix) for key in tensors):
            ignored += [key for key in tensors if not key.startswith(prefix)]
            tensors = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    return tensors, ignored


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """Registry name and constructor kwargs that fit a backbone state dict (standard shapes only)."""
    if "patch_embed.proj.weight" in state:
        embed_dim, _, patch_size, _ = state["patch_embed.proj.weight"].shape
        depth = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key)))
        sizes = {(dim, blocks): name for name, (dim, blocks, _) in VIT_SIZES.items()}
        if (embed_dim, depth) not in sizes:
            raise ValueError(f"a ViT with width {embed_dim} and depth {depth} is not a registered size; "
                             "pass arch= (and its kwargs) explicitly")
        class_token = "cls_token" in state
        side = math.isqrt(state["pos_embed"].shape[1] - int(class_token))
        kwargs = {"img_size": side * patch_size, "class_token": class_token}
        if "norm.weight" not in state:  # SelfPatch's CaiT-style backbone ends without a LayerNorm
            kwargs["final_norm"] = False
        return f"vit_{sizes[embed_dim, depth]}_patch{patch_size}", kwargs
    if "layer1.0.conv1.weight" in state:
        removed = [name for name in ("layer3", "layer4") if f"{name}.0.conv1.weight" not in state]
        return "resnet18_crw", {"remove_layers": removed} if removed else {}
    raise ValueError("cannot tell the architecture from the weights (no ViT patch_embed, no ResNet layer1); "
                     "pass arch= explicitly")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                 strict: bool = True, assign: bool = False) -> list[str]:
    """Load backbone weights into ``model``; resize positional embeddings to the model's grid.

    Extra entries (classifier heads, layers removed for testing) are skipped and returned, and
    logged with their count. Missing backbone weights raise unless ``strict`` is False.
    ``assign`` adopts the checkpoint tensors (cast to the model's dtypes) instead of copying them,
    for models built on the meta device; it implies ``strict``.
    """
    reference = model.state_dict()
    state = {key: value.to(reference[key].dtype) if key in reference and value.is_floating_point() else value
             for key, value in state.items()}
    if isinstance(model, VisionTransformer) and "pos_embed" in state:
        side = math.isqrt(model.pos_embed.shape[1] - model.num_prefix_tokens)
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], (side, side), model.num_prefix_tokens)
    missing = sorted(set(reference) - set(state))
    if missing and (strict or assign):
        raise ValueError(f"{source} lacks {len(missing)} weights of the model ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}): is the architecture right?")
    unexpected = sorted(set(state) - set(reference))
    skippable = SKIPPABLE_MODULES | set(getattr(model, "removed_modules", ()))
    foreign = [key for key in unexpected if key.split(".")[0] not in skippable]
    if foreign:  # e.g. DINOv2's LayerScale (blocks.N.ls1.gamma): ignoring it would change the features
        raise ValueError(f"{source} has {len(foreign)} weights this model does not implement "
                         f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): "
                         "it is a different architecture; pass the matching arch=")
    model.load_state_dict({key: state[key] for key in state if key in reference}, strict=False, assign=assign)
    if unexpected:
        log.warning("%s: skipped %d entries that are not part of the backbone: %s%s", source, len(unexpected),
                    ", ".join(unexpected[:8]), ", ..." if len(unexpected) > 8 else "")
    return unexpected


def load_backbone(path: str | Path, arch: str | None = None, which: str = "teacher", trust_pickle: bool = False,
                  **overrides) -> nn.Module:
    """Build a backbone from a checkpoint file and load its weights (eval mode, on CPU).

    ``arch`` (a ``models.build`` name) is read from our exports and inferred from standard DINO /
    timm / CRW weights when not given. ``which`` picks the teacher or student of a training
    checkpoint. ``overrides`` go to the constructor (e.g. ``attn="math"``, ``remove_layers=["layer4"]``).
    """
    checkpoint, metadata = read_checkpoint(path, trust_pickle)
    state, ignored = backbone_state_dict(checkpoint, which)
    if ignored:
        log.info("%s: %d entries are not backbone weights (e.g. %s)", path, len(ignored), ", ".join(ignored[:5]))
    kwargs: dict = {}
    if metadata.get("format") == EXPORT_FORMAT:
        arch = arch or metadata["arch"]
        kwargs = json.loads(metadata["kwargs"])
    elif arch is None:
        arch, kwargs = infer_arch(state)
    with torch.device("meta"):  # no random init: every weight comes from the checkpoint
        model = build(arch, **{**kwargs, **overrides})
    load_weights(model, state, source=str(path), assign=True)
    return model.eval()


def export_backbone(model: nn.Module, path: str | Path, arch: str | None = None, **kwargs) -> Path:
    """Save ``model``'s weights as safetensors with ``arch`` and ``kwargs`` in the metadata.

    ViT keys are timm's, so the file also loads into ``timm``'s ``VisionTransformer(num_classes=0)``.
    ``arch`` and ``kwargs`` default to what ``models.build`` recorded on the model. Written to a
    temporary name first, then renamed, so readers never see half a file.
    """
    from safetensors.torch import save_file

    for wrapper in ("module", "_orig_mod"):  # DistributedDataParallel, then torch.compile
        model = getattr(model, wrapper, model)
    if arch is None:
        if not hasattr(model, "build_spec"):
            raise ValueError("the model was not made by models.build: pass arch= and its kwargs")
        arch, recorded = model.build_spec
        kwargs = {**{k: v for k, v in recorded.items() if k not in RUNTIME_KWARGS}, **kwargs}
    if getattr(model, "removed_modules", None):  # stages dropped after build (CRW's test-time encoder)
        kwargs["remove_layers"] = list(model.removed_modules)
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    metadata = {"format": EXPORT_FORMAT, "arch": arch, "kwargs": json.dumps(kwargs, sort_keys=True)}
    save_file(state, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path
