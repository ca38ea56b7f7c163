"""Checkpoint import and export for backbones.

Reads: our exports (safetensors with ``arch``/``kwargs`` metadata), official DINO checkpoints
(plain backbone state dicts, or full training checkpoints with ``student``/``teacher`` and
``module.``/``backbone.`` prefixes), official DINOv2 checkpoints (``dinov2_vits14_pretrain.pth``,
``dinov2_vits14_reg4_pretrain.pth``, ViT-B likewise, and DINOv2 training checkpoints with chunked
blocks), timm ViT state dicts (DINOv2 ones included), CRW (videowalk) checkpoints, and the same formats
written by DoRA/SMTC/TimeT (``encoder.`` prefixes). Writes: a backbone as a safetensors file with timm
key names, loadable by ``timm.models.vision_transformer.VisionTransformer`` (or ``timm.create_model``
of the same name, for DINOv2) as is; and the networks an objective runs on top of it (SMTC's slots) as
a head export, rebuilt around that backbone by ``load_smtc_slots``.

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

from models.registry import DINOV2_SIZES, build
from models.slots import SMTCSlots
from models.vit import VIT_SIZES, VisionTransformer, resize_pos_embed

log = logging.getLogger(__name__)

EXPORT_FORMAT = "densevid-backbone-v1"
HEAD_FORMAT = "densevid-head-v1"
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
    return dinov2_to_timm(tensors), ignored


def dinov2_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 key layout -> timm's, which our ViT stores; other layouts are returned as they are.

    * Training checkpoints chunk the blocks (``blocks.<chunk>.<block>.``, the block index global):
      back to ``blocks.<block>.``.
    * Registers: ``register_tokens`` becomes ``reg_token``, and the CLS position is folded into
      ``cls_token`` and dropped from ``pos_embed`` (as timm's ``_convert_dinov2``): the official model
      adds positions to [CLS, patches] and then inserts the registers, which is the same computation.

    ``mask_token`` (iBOT's masked-patch token, unused by a backbone) is left for ``load_weights`` to skip.
    """
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key): value for key, value in state.items()}
    if "register_tokens" in state:
        state = dict(state)
        pos_embed = state.pop("pos_embed")
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state.pop("cls_token") + pos_embed[:, :1]
        state["pos_embed"] = pos_embed[:, 1:]
    return state


def _is_square(number: int) -> bool:
    return number >= 0 and math.isqrt(number) ** 2 == number


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """Registry name and constructor kwargs that fit a backbone state dict in timm's layout (standard
    shapes only): DINOv2's LayerScale (``ls1.gamma``) at patch 14 with 0 or 4 registers names
    ``vit_{size}_patch14[_reg4]_dinov2``; the native grid comes from ``pos_embed``."""
    if "patch_embed.proj.weight" in state:
        embed_dim, _, patch_size, _ = state["patch_embed.proj.weight"].shape
        depth = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key)))
        sizes = {(dim, blocks): name for name, (dim, blocks, _) in VIT_SIZES.items()}
        if (embed_dim, depth) not in sizes:
            raise ValueError(f"a ViT with width {embed_dim} and depth {depth} is not a registered size; "
                             "pass arch= (and its kwargs) explicitly")
        size = sizes[embed_dim, depth]
        class_token = "cls_token" in state
        registers = state["reg_token"].shape[1] if "reg_token" in state else 0
        positions = state["pos_embed"].shape[1]
        prefix = int(class_token) + registers
        # timm stores DINOv2-reg without positions for the prefix tokens (no_embed_class)
        pos_prefix = prefix if _is_square(positions - prefix) else 0
        if not _is_square(positions - pos_prefix):
            raise ValueError(f"pos_embed has {positions} positions: neither a square grid nor one plus {prefix} "
                             "prefix tokens; pass arch= explicitly")
        kwargs = {"img_size": math.isqrt(positions - pos_prefix) * patch_size}
        layer_scale = "blocks.0.ls1.gamma" in state
        if layer_scale and patch_size == 14 and registers in (0, 4) and size in DINOV2_SIZES and class_token \
                and pos_prefix == (0 if registers else 1):
            return f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2", kwargs
        kwargs["class_token"] = class_token
        if "norm.weight" not in state:  # SelfPatch's CaiT-style backbone ends without a LayerNorm
            kwargs["final_norm"] = False
        if registers:
            kwargs.update(reg_tokens=registers, no_embed_class=pos_prefix == 0)
        return f"vit_{size}_patch{patch_size}", kwargs
    if "layer1.0.conv1.weight" in state:
        removed = [name for name in ("layer3", "layer4") if f"{name}.0.conv1.weight" not in state]
        width = state["layer1.0.conv1.weight"].shape[0]
        kwargs = {"remove_layers": removed} if removed else {}
        return "resnet18_crw", kwargs if width == 64 else {**kwargs, "width": width}
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
    if isinstance(model, VisionTransformer) and "pos_embed" in state:
        side = math.isqrt(model.pos_embed.shape[1] - model.num_pos_prefix_tokens)
        try:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], (side, side), model.num_pos_prefix_tokens,
                                                  model.pos_interpolation)
        except ValueError:  # positions for another number of prefix tokens: reported with the shapes below
            pass
    wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(reference[key].shape)}" for key in state
             if key in reference and state[key].shape != reference[key].shape]
    if wrong:
        raise ValueError(f"{source} has {len(wrong)} weights of another shape than the model's "
                         f"({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}): is the architecture right? "
                         "Leave arch unset to infer it from the weights")
    model.load_state_dict({key: state[key] for key in state if key in reference}, strict=False, assign=assign)
    if unexpected:
        log.warning("%s: skipped %d entries that are not part of the backbone: %s%s", source, len(unexpected),
                    ", ".join(unexpected[:8]), ", ..." if len(unexpected) > 8 else "")
    return unexpected


def load_backbone(path: str | Path, arch: str | None = None, which: str = "teacher", trust_pickle: bool = False,
                  **overrides) -> nn.Module:
    """Build a backbone from a checkpoint file and load its weights (eval mode, on CPU).

    ``arch`` (a ``models.build`` name) is read from our exports and inferred from standard DINO /
    DINOv2 / timm / CRW weights when not given. ``which`` picks the teacher or student of a training
    checkpoint. ``overrides`` go to the constructor (e.g. ``attn="math"``, ``drop_path=0.1``,
    ``img_size=224``, ``remove_layers=["layer4"]``); the result is a fresh, trainable model.
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


def load_into(model: nn.Module, path: str | Path, which: str = "teacher", trust_pickle: bool = False) -> list[str]:
    """Copy the backbone weights of a checkpoint file into an already built ``model`` (initialising a
    training run from pretrained weights); returns the skipped entries.

    Reads every format ``load_backbone`` reads; the model's architecture decides, and weights that do
    not fit it (missing, foreign or of another shape) raise ``ValueError`` naming them. Positional
    embeddings are resized to the model's grid with the model's interpolation rule.
    """
    checkpoint, _ = read_checkpoint(path, trust_pickle)
    state, _ = backbone_state_dict(checkpoint, which)
    return load_weights(model, state, source=str(path))


def export_backbone(model: nn.Module, path: str | Path, arch: str | None = None, **kwargs) -> Path:
    """Save ``model``'s weights as safetensors with ``arch`` and ``kwargs`` in the metadata.

    ViT keys are timm's, so the file also loads into ``timm``'s ``VisionTransformer(num_classes=0)``.
    ``arch`` and ``kwargs`` default to what ``models.build`` recorded on the model. Written to a
    temporary name first, then renamed, so readers never see half a file; missing parent folders are made.
    """
    for wrapper in ("module", "_orig_mod"):  # DistributedDataParallel, then torch.compile
        model = getattr(model, wrapper, model)
    if arch is None:
        if not hasattr(model, "build_spec"):
            raise ValueError("the model was not made by models.build: pass arch= and its kwargs")
        arch, recorded = model.build_spec
        kwargs = {**{k: v for k, v in recorded.items() if k not in RUNTIME_KWARGS}, **kwargs}
    if getattr(model, "removed_modules", None):  # stages dropped after build (CRW's test-time encoder)
        kwargs["remove_layers"] = list(model.removed_modules)
    metadata = {"format": EXPORT_FORMAT, "arch": arch, "kwargs": json.dumps(kwargs, sort_keys=True)}
    return _save_weights(model, path, metadata)


def _save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str]) -> Path:
    """``module``'s state dict as safetensors with ``metadata``, under a temporary name first, then renamed,
    so readers never see half a file; missing parent folders are made."""
    from safetensors.torch import save_file

    state = {key: value.detach().to("cpu").contiguous() for key, value in module.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path


def export_head(module: nn.Module, path: str | Path, settings: dict) -> Path:
    """Save a network beside the backbone (an objective's ``export_heads``, e.g. SMTC's slots) as
    safetensors with the JSON ``settings`` that rebuild it in the metadata; written like
    :func:`export_backbone`. The backbone it runs on is the ``backbone.safetensors`` of the same folder."""
    return _save_weights(module, path, {"format": HEAD_FORMAT, "settings": json.dumps(settings, sort_keys=True)})


def load_smtc_slots(path: str | Path, encoder: nn.Module, **overrides) -> tuple[SMTCSlots, dict]:
    """SMTC's slot network (``models.slots.SMTCSlots``, eval mode) around ``encoder`` (the backbone
    exported beside the head) from a head export, and the settings it was built with: the export's
    (with what the objective added, e.g. SMTC's ``clip_len``), edited by ``overrides`` (``iters=5``)."""
    state, metadata = read_checkpoint(path)
    if metadata.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path} is not a densevid head export (metadata format {metadata.get('format')!r})")
    settings = {**json.loads(metadata["settings"]), **overrides}
    network = SMTCSlots.from_settings(encoder, settings)
    network.head().load_state_dict(state)  # strict: a missing or foreign weight names itself
    return network.eval(), settings
