"""The settings of label propagation (eval/label_prop.py): the published presets and the command-line
options that override them. Importable without torch, so that eval/run.py checks a command line before
paying for the torch import."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINO's eval_video_segmentation.py normalises red with 0.228 (its color_normalize; every other DINO
# script uses 0.229): the dino preset follows the script, since its masks are what a paper number means.
DINO_SCRIPT_STD = (0.228, 0.224, 0.225)
RESIZES = ("cv2", "bilinear", "antialias")


@dataclass(frozen=True)
class PropagationConfig:
    """Every knob of the propagation; see PRESETS for the published settings."""

    context: int = 7                 # previous frames kept as context (plus the first frame)
    topk: int = 5                    # neighbours kept per query cell, jointly over the whole context
    radius: float = 12.0             # neighbourhood size in feature cells
    neighbourhood: str = "square"    # "square": |di|, |dj| <= radius; "circle": di^2 + dj^2 < radius^2
    restrict_first: bool = True      # apply the neighbourhood to the first frame too
    pad_with_first: bool = False     # missing previous frames are copies of the first frame (CRW)
    temperature: float = 0.1
    label_resize: str = "nearest"    # first-frame labels to the feature grid: "nearest" | "bilinear"
    output: str = "dino"             # "dino": x stride bilinear, min-max, argmax, nearest | "crw": bilinear, argmax
    short_side: int | None = 480     # resize frames so the short side is this (None: native size, see network_size)
    resize: str = "cv2"              # how frames reach the network size (eval/label_prop.network_input):
                                     # "cv2": cv2.resize INTER_LINEAR of the uint8 frame (DINO's read_frame);
                                     # "bilinear": bilinear, no antialiasing, of the normalised float frame
                                     # (SMTC's eval_prop); "antialias": antialiased bilinear rounded to uint8
                                     # (shrinking frames a lot, e.g. a CPU budget's short side, without aliasing)
    std: tuple[float, float, float] = DINO_SCRIPT_STD  # per-channel std of the normalisation (mean: ImageNet's)
    final_norm: bool | None = None   # ViT features after the final LayerNorm; None: the backbone's own choice
                                     # (after it, except SMTC / SelfPatch exports); False: SMTC's eval_prop, whose
                                     # encoder returns the last block's output
    size_multiple: int = 64          # floor the resized long side to a multiple of this (if the stride divides it)
    upsample: int = 1                # bilinear feature-map upsampling before propagation (SMTC setting B: 2)
    tile: int = 8                    # query tile side in cells (memory and speed knob; results identical)

    def __post_init__(self):
        if self.neighbourhood not in ("square", "circle"):
            raise ValueError(f"neighbourhood must be 'square' or 'circle', got {self.neighbourhood!r}")
        if self.label_resize not in ("nearest", "bilinear") or self.output not in ("dino", "crw"):
            raise ValueError("label_resize must be nearest|bilinear and output dino|crw")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {'|'.join(RESIZES)}, got {self.resize!r}")
        if self.topk < 1 or self.context < 0 or self.temperature <= 0 or self.tile < 1 or self.upsample < 1:
            raise ValueError(f"invalid propagation settings: {self}")


PRESETS = {
    "dino": PropagationConfig(),
    "crw": PropagationConfig(context=20, topk=10, radius=12.0, neighbourhood="circle", restrict_first=False,
                             pad_with_first=True, temperature=0.05, label_resize="bilinear", output="crw",
                             short_side=None, resize="bilinear", std=IMAGENET_STD),
}
# SMTC's setting A (ViT-S/16 features through CRW's propagation; evaluation.md §2.5): top-7, radius 7, T 0.2
PRESETS["smtc"] = replace(PRESETS["crw"], topk=7, radius=7.0, temperature=0.2, final_norm=False)
# SMTC's setting B (features interpolated to stride 8 before the L2 norm): top-28, radius 35, T 0.2
PRESETS["smtc_upsampled"] = replace(PRESETS["smtc"], topk=28, radius=35.0, upsample=2)


def add_propagation_args(parser: argparse.ArgumentParser) -> None:
    """The propagation options of ``eval/run.py labelprop``."""
    parser.add_argument("--protocol", default="dino", choices=sorted(PRESETS),
                        help="published preset; the options below override single settings")
    parser.add_argument("--context", type=int, help="previous frames used as context (dino 7, crw 20)")
    parser.add_argument("--topk", type=int, help="neighbours kept per cell over the whole context (dino 5, crw 10)")
    parser.add_argument("--radius", type=float, help="neighbourhood size in feature cells (12 for both)")
    parser.add_argument("--neighbourhood", choices=("square", "circle"), help="neighbourhood shape")
    parser.add_argument("--temperature", type=float, help="softmax temperature (dino 0.1, crw 0.05)")
    parser.add_argument("--short-side", type=int, help="resize frames to this short side (dino 480); 0 keeps size")
    parser.add_argument("--resize", choices=RESIZES,
                        help="how frames are resized: cv2 (dino: cv2 INTER_LINEAR on uint8), bilinear (crw/smtc: "
                             "normalised float, no antialiasing), antialias (antialiased, for frames shrunk a lot)")
    parser.add_argument("--upsample", type=int,
                        help="bilinear feature upsampling before propagation (smtc_upsampled 2: stride 16->8, 14->7)")
    parser.add_argument("--tile", type=int, help="query tile side in cells (speed/memory only; default 8)")
    parser.add_argument("--final-norm", action=argparse.BooleanOptionalAction, default=None,
                        help="ViT features after the final LayerNorm (default: the preset's; smtc reads them before "
                             "it, as SMTC's script does; dino and crw: the checkpoint's own choice)")
    parser.add_argument("--layer", type=int, default=1, help="ViT block counted from the end (1 = last)")
    parser.add_argument("--batch", type=int, default=8, help="frames per backbone forward")


def config_from_args(args: argparse.Namespace) -> PropagationConfig:
    overrides = {k: getattr(args, k) for k in ("context", "topk", "radius", "neighbourhood", "temperature", "tile",
                                                  "upsample", "resize", "final_norm")
                 if getattr(args, k) is not None}
    if args.short_side is not None:
        overrides["short_side"] = args.short_side or None
    return replace(PRESETS[args.protocol], **overrides)
