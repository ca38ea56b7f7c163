"""Evaluate a backbone: label propagation (DAVIS J&F), clustering mIoU, kNN, linear probe, object discovery.

    python eval/run.py labelprop --ckpt RUN --data DAVIS_OR_EVAL_SHARDS [--protocol dino|crw]
    python eval/run.py labelprop --features pixels --data DAVIS_OR_EVAL_SHARDS   (raw-pixel baseline)
    python eval/run.py clusters  --ckpt RUN --data DAVIS_OR_EVAL_SHARDS [--granularity frame|clip|dataset]
    python eval/run.py knn       --ckpt RUN --data LABELLED_SHARDS [--val-data LABELLED_SHARDS]
    python eval/run.py linear    --ckpt RUN --data LABELLED_SHARDS [--val-data LABELLED_SHARDS]
    python eval/run.py discovery --ckpt RUN --data DAVIS_UNSUPERVISED [--proposals 8] [--proposals-from slots|features]

``--ckpt`` is a run directory (its backbone.safetensors), a checkpoint folder of a run
(``RUN/checkpoints/step-N``), an exported .safetensors, or an official
DINO / DINOv2 / timm / CRW checkpoint (``--arch`` when the architecture cannot be inferred). Each command
shows progress bars on a terminal, prints a table, writes ``<out>/<command>.json`` (``--out`` defaults to
``<run>/eval/<command>`` for a run directory and ``eval-<command>`` otherwise) and ends with one summary
line, e.g. ``clusters: 32 units, mIoU 0.328, 36.4 s; wrote eval-clusters/clusters.json``.

A bad command line is one ``error: ...`` line (exit status 2), decided before torch is imported.
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Only light imports here: the command line and the input paths are checked before main() imports
# torch and the evaluation code (seconds on a cold start).
import argparse
import json
import time
from pathlib import Path

from eval.propagation_config import add_propagation_args
from shard_tools.cli import ArgumentParser, fail
from shard_tools.manifest import MANIFEST


def default_out(ckpt: str | None, command: str) -> Path:
    return Path(ckpt) / "eval" / command if ckpt and Path(ckpt).is_dir() else Path(f"eval-{command}")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="eval/run.py", description=__doc__.split("\n")[0], epilog=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", help="run dir, its checkpoints/step-N folder, exported .safetensors, or "
                                       "DINO/DINOv2/timm/CRW checkpoint (required unless labelprop --features pixels)")
    common.add_argument("--arch", help="architecture (models.build name) when it cannot be inferred")
    common.add_argument("--data", required=True, help="dataset folder (see the command)")
    common.add_argument("--out", help="output folder (default <run>/eval/<command> or ./eval-<command>)")
    common.add_argument("--seed", type=int, default=1, help="k-means / probe seed (discovery: and the slots' "
                                                             "instance draw)")
    common.add_argument("--trust-pickle", action="store_true", help="allow pickled (non weights-only) .pth")
    common.add_argument("--device", default="auto",
                        help="cuda, cpu, or auto: cuda when a GPU is visible, else cpu (resolved once the "
                             "command line has been checked)")
    defaults = argparse.ArgumentDefaultsHelpFormatter

    p = commands.add_parser("labelprop", parents=[common], formatter_class=defaults,
                            help="semi-supervised label propagation + DAVIS J&F (--data: DAVIS folder or eval shards)")
    p.add_argument("--set", default="val", help="DAVIS subset (ImageSets/2017/<set>.txt)")
    p.add_argument("--visualize", action="store_true", help="also write <out>/vis/<sequence>.png (strip) and .gif")
    p.add_argument("--no-score", action="store_true", help="only write the masks (sets without annotations)")
    p.add_argument("--features", default="backbone", choices=("backbone", "pixels"),
                   help="pixels: raw 8x8x3 pixel cells of the normalised frames instead of a network (no --ckpt): "
                        "the baseline a trained backbone has to beat")
    add_propagation_args(p)

    p = commands.add_parser("clusters", parents=[common], formatter_class=defaults,
                            help="k-means of patch features, Hungarian / many-to-one matching, mIoU")
    p.add_argument("--set", default="val", help="DAVIS subset")
    p.add_argument("--granularity", default="clip", choices=("frame", "clip", "dataset"),
                   help="one clustering per frame, per clip of --clip-frames, or over everything")
    p.add_argument("--clip-frames", type=int, default=4, help="frames per clip")
    p.add_argument("--size", type=int, default=224, help="input side (resize short side + centre crop)")
    p.add_argument("--eval-size", type=int, default=224, help="mask side the mIoU is computed at")
    p.add_argument("--k", type=int, help="clusters (default: GT classes present in the unit)")
    p.add_argument("--overcluster", action="store_true", help="many-to-one precision matching (use with --k > classes)")
    p.add_argument("--pca-dims", type=int, default=50, help="PCA dimensions before k-means")
    p.add_argument("--fit-points", type=int, default=50_000,
                   help="upsampled pixels per unit (spread over its frames, drawn with --seed) that k-means is "
                        "fitted on; every pixel then gets its nearest centroid. 0: fit on every pixel (slow)")
    p.add_argument("--layer", type=int, default=1, help="ViT block counted from the end")
    p.add_argument("--batch", type=int, default=16, help="frames per forward")

    for name, help_text in (("knn", "weighted kNN (k=20, T=0.07) on frames of labelled shards"),
                            ("linear", "linear probe on frozen descriptors of labelled shards")):
        p = commands.add_parser(name, parents=[common], formatter_class=defaults, help=help_text)
        p.add_argument("--val-data", help="labelled shards to test on (default: hold out samples of --data)")
        p.add_argument("--holdout-every", type=int, default=5, help="without --val-data: every n-th sample per class is test")
        p.add_argument("--frames-per-sample", type=int, default=1, help="evenly spaced frames taken per sample")
        p.add_argument("--n-last-blocks", type=int, default=1 if name == "knn" else 4,
                       help="CLS tokens of the last n blocks, concatenated (DINO: 1 for kNN, 4 for linear ViT-S)")
        p.add_argument("--avgpool", action="store_true", help="append the mean patch token (DINO ViT-B linear)")
        p.add_argument("--batch", type=int, default=64, help="images per forward")
        if name == "knn":
            p.add_argument("--k", type=int, default=20, help="neighbours")
            p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T)")
        else:
            p.add_argument("--epochs", type=int, default=100, help="training epochs")
            p.add_argument("--batch-size", type=int, default=256, help="probe batch size")
            p.add_argument("--lr", type=float, default=0.001, help="base lr per 256 samples (SGD momentum 0.9, cosine)")

    p = commands.add_parser("discovery", parents=[common], formatter_class=defaults,
                            help="object proposals (an SMTC run's slots, or k-means of features) scored on "
                                 "DAVIS-2017 unsupervised (official protocol)")
    p.add_argument("--set", default="val", help="DAVIS subset")
    p.add_argument("--proposals", type=int, default=8, help="proposals per sequence (official limit 20)")
    p.add_argument("--proposals-from", choices=("slots", "features"),
                   help="slots: the slot head the run exported (slots.safetensors, SMTC); features: k-means of "
                        "the backbone's patch features (default: slots when --ckpt holds them, else features)")
    p.add_argument("--lenient-per-frame", action="store_true",
                   help="SMTC's lenient scoring: Hungarian matching per frame (NOT the official protocol)")
    p.add_argument("--layer", type=int, default=1, help="features: ViT block counted from the end")
    p.add_argument("--slot-iters", type=int, default=5, help="slots: slot-attention iterations per stage "
                                                             "(SMTC trains with 3 and evaluates with 5)")
    p.add_argument("--clip-frames", type=int, help="slots: consecutive frames per clip (default: the run's clip_len)")
    p.add_argument("--min-similarity", type=float,
                   help="slots: an instance is a candidate where cos(semantic slot, instance slot) >= this "
                        "(default: SMTC's valid-instance level, eval/discovery.py MIN_SLOT_SIMILARITY)")
    p.add_argument("--mask-threshold", type=float,
                   help="slots: a pixel is background where its proposal's mask is below this fraction of its "
                        "min-max range in the frame (default: SMTC's scorer, eval/discovery.py MASK_THRESHOLD)")
    p.add_argument("--batch", type=int, default=8, help="frames per forward")
    return parser


# What --data must be for each command: evaluation data (DAVIS folder or eval shards), or labelled shards.
LABELLED = ("knn", "linear")


def check_inputs(args: argparse.Namespace) -> None:
    """Fail before loading anything, with the flag that is wrong and what it must be."""
    pixels = getattr(args, "features", "backbone") == "pixels"
    if pixels and args.ckpt:
        raise UsageError("--features pixels uses no network: drop --ckpt")
    if not pixels and not args.ckpt:
        raise UsageError("--ckpt is required (a run directory or checkpoint file), or pass labelprop --features pixels")
    if args.ckpt and not Path(args.ckpt).exists():
        raise UsageError(f"--ckpt {args.ckpt}: no such file or folder (a run directory, an exported "
                         ".safetensors or an official checkpoint)")
    if getattr(args, "fit_points", 0) < 0:
        raise UsageError(f"--fit-points {args.fit_points}: a number of pixels, or 0 for every pixel")
    for flag in ("data", "val_data"):
        data = getattr(args, flag, None)
        if data is None:
            continue
        data, name = Path(data), "--" + flag.replace("_", "-")
        if args.command in LABELLED:
            if not (data / MANIFEST).is_file():
                raise UsageError(f"{name} {data}: no {MANIFEST}; pass labelled shards from "
                                 "`shard_tools/pack.py --kind videos`")
        elif not (data / MANIFEST).is_file() and not (data / "JPEGImages").is_dir():
            raise UsageError(f"{name} {data}: neither evaluation shards ({MANIFEST}) nor a DAVIS-layout folder "
                             "(JPEGImages/480p/<sequence>/); pack one with `shard_tools/pack.py --kind frames`")


class UsageError(Exception):
    """A command line that cannot work: one line on stderr, exit status 2."""


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_inputs(args)

    # The command line is good: only now pay for torch and the evaluation code (seconds).
    import torch

    from eval.commands import COMMANDS
    from eval.features import SLOTS_FILE, PixelCells, load_backbone, slot_export

    if args.command == "discovery" and args.proposals_from == "slots" and not slot_export(args.ckpt):
        raise UsageError(f"--proposals-from slots: {args.ckpt} holds no {SLOTS_FILE}; pass the folder of an SMTC "
                         "run (or its checkpoints/step-N or init/), or use --proposals-from features")
    pixels = getattr(args, "features", "backbone") == "pixels"
    args.out = Path(args.out) if args.out else default_out(args.ckpt, args.command)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    backbone = (PixelCells() if pixels else load_backbone(args.ckpt, args.arch, args.trust_pickle)).to(device)
    started = time.perf_counter()
    result, headline = COMMANDS[args.command](args, backbone, device)
    result.update(command=args.command, ckpt=str(args.ckpt) if args.ckpt else "pixels", data=str(args.data),
                  seconds=time.perf_counter() - started)
    path = args.out / f"{args.command}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"{args.command}: {headline}, {result['seconds']:.1f} s; wrote {path}")
    return result


def run_from_command_line(argv: list[str] | None = None) -> int:
    """``python eval/run.py``: main(), with a usage error reported as its one line; the exit status."""
    try:
        main(argv)
    except UsageError as err:
        return fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(run_from_command_line())
