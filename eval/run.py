"""Evaluate a backbone: label propagation (DAVIS J&F), clustering mIoU, kNN, linear probe, object discovery.

    python eval/run.py labelprop --ckpt RUN --data DAVIS_OR_EVAL_SHARDS [--protocol dino|crw]
    python eval/run.py labelprop --features pixels --data DAVIS_OR_EVAL_SHARDS   (raw-pixel baseline)
    python eval/run.py clusters  --ckpt RUN --data DAVIS_OR_EVAL_SHARDS [--granularity frame|clip|dataset]
    python eval/run.py knn       --ckpt RUN --data LABELLED_SHARDS [--val-data LABELLED_SHARDS]
    python eval/run.py linear    --ckpt RUN --data LABELLED_SHARDS [--val-data LABELLED_SHARDS]
    python eval/run.py discovery --ckpt RUN --data DAVIS_UNSUPERVISED [--proposals 8]

``--ckpt`` is a run directory (its backbone.safetensors), a checkpoint folder of a run
(``RUN/checkpoints/step-N``), an exported .safetensors, or an official
DINO / DINOv2 / timm / CRW checkpoint (``--arch`` when the architecture cannot be inferred). Each command prints a
table and writes ``<out>/<command>.json`` (``--out`` defaults to ``<run>/eval/<command>`` for a run
directory and ``eval-<command>`` otherwise).
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval import clustering, davis_metrics, discovery, knn_linear, label_prop, visualize
from eval.davis_io import open_sequences, read_mask, write_mask
from eval.features import PixelCells, dense_feature_fn, feature_stride, global_descriptor, load_backbone
from shard_tools.cli import fail
from shard_tools.manifest import MANIFEST


def default_out(ckpt: str | None, command: str) -> Path:
    return Path(ckpt) / "eval" / command if ckpt and Path(ckpt).is_dir() else Path(f"eval-{command}")


def _batched(fn, items: np.ndarray, batch: int, device: torch.device) -> torch.Tensor:
    return torch.cat([fn(torch.from_numpy(items[i:i + batch]).to(device)) for i in range(0, len(items), batch)])


def run_labelprop(args, backbone, device) -> dict:
    cfg = label_prop.config_from_args(args)
    sequences = open_sequences(args.data, subset=args.set)
    timing = label_prop.propagate_sequences(sequences, dense_feature_fn(backbone, args.layer, upsample=cfg.upsample),
                                            feature_stride(backbone), cfg, args.out, device, args.batch)
    result = {"protocol": args.protocol, "config": asdict(cfg), "timing": timing}
    if args.visualize:
        for sequence in sequences:
            frames = [sequence.frame(i) for i in range(len(sequence.frames))]
            masks = [read_mask(Path(args.out) / sequence.name / f"{stem}.png") for stem in sequence.frame_stems]
            visualize.save_png(Path(args.out) / "vis" / f"{sequence.name}.png", visualize.overlay_strip(frames, masks))
            visualize.save_gif(Path(args.out) / "vis" / f"{sequence.name}.gif", frames, masks)
    print(f"{timing['frames']} frames at {timing['frames_per_second']:.2f} frames/s (protocol {args.protocol})")
    if args.no_score:
        return result
    scores = davis_metrics.evaluate_sequences(sequences, args.out)
    davis_metrics.write_csvs(scores, args.out, args.set)
    result.update(scores=davis_metrics.global_table(scores), per_object=davis_metrics.per_object_table(scores))
    print(davis_metrics.format_table([result["scores"]], davis_metrics.GLOBAL_COLUMNS))
    return result


def run_clusters(args, backbone, device) -> dict:
    """TimeT's protocol: frames resized (short side) and centre-cropped to --size, patch features
    standardised + PCA-projected, upsampled to --eval-size, k-means per unit (fitted on --fit-points
    pixels, every pixel assigned), matched, mIoU averaged over units (clustering.cluster_feature_maps)."""
    stride = feature_stride(backbone)
    if args.size % stride:
        raise SystemExit(f"error: --size {args.size} is not a multiple of the backbone's patch size {stride}; "
                         f"use {args.size // stride * stride} or {(args.size // stride + 1) * stride}")
    feature_fn = dense_feature_fn(backbone, args.layer)
    units: list[tuple[list[torch.Tensor], list[np.ndarray]]] = []
    for sequence in open_sequences(args.data, subset=args.set):
        annotated = [i for i, stem in enumerate(sequence.frame_stems) if stem in sequence.masks]
        step = {"frame": 1, "clip": args.clip_frames, "dataset": len(annotated)}[args.granularity]
        for start in range(0, len(annotated), step):
            picks = annotated[start:start + step]
            images = knn_linear.center_crop_frames(np.stack([sequence.frame(i) for i in picks]), args.size, args.size)
            masks = knn_linear.center_crop_frames(np.stack([sequence.mask(sequence.frame_stems[i]) for i in picks]),
                                                  args.eval_size, args.eval_size, Image.NEAREST)
            feats = _batched(feature_fn, images, args.batch, device)
            units.append((list(feats), list(masks)))
    if args.granularity == "dataset":
        units = [([f for u in units for f in u[0]], [m for u in units for m in u[1]])]
    results = []
    for feats, masks in units:
        gt = np.stack(masks)
        k = args.k or len(clustering.gt_classes(gt))
        labels = clustering.cluster_feature_maps(torch.stack(feats), args.eval_size, k, args.pca_dims,
                                                 args.fit_points, args.seed)
        results.append(clustering.cluster_miou(labels.cpu().numpy(), gt, k, args.overcluster))
    table = {"mIoU": float(np.mean([r["miou"] for r in results])), "units": len(results),
             "granularity": args.granularity, "matching": results[0]["matching"]}
    print(davis_metrics.format_table([table], ("mIoU", "units", "granularity", "matching")))
    return {"scores": table, "per_unit": [r["miou"] for r in results]}


def _descriptors(args, backbone, device, data: str) -> tuple[torch.Tensor, np.ndarray, list[str], dict]:
    images, labels, keys, report = knn_linear.labelled_frames(data, args.frames_per_sample)
    fn = lambda x: global_descriptor(backbone, x, args.n_last_blocks, args.avgpool)  # noqa: E731
    return _batched(fn, images, args.batch, device), labels, keys, report


def _train_test(args, backbone, device):
    feats, labels, keys, report = _descriptors(args, backbone, device, args.data)
    if args.val_data:
        test_feats, test_labels, _, test_report = _descriptors(args, backbone, device, args.val_data)
        report = {"train": report, "val": test_report}
        train_feats, train_labels = feats, labels
    else:
        held_out = knn_linear.split_by_sample(keys, labels, every=args.holdout_every)
        train_feats, train_labels = feats[torch.from_numpy(~held_out)], labels[~held_out]
        test_feats, test_labels = feats[torch.from_numpy(held_out)], labels[held_out]
        report["split"] = f"every {args.holdout_every}th sample of each class held out"
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    return (train_feats, torch.from_numpy(train_labels).to(device), test_feats,
            torch.from_numpy(test_labels).to(device), num_classes, report)


def run_knn(args, backbone, device) -> dict:
    train, train_labels, test, test_labels, num_classes, report = _train_test(args, backbone, device)
    scores = knn_linear.knn_scores(train, train_labels, test, num_classes, args.k, args.temperature)
    table = {**knn_linear.topk_accuracy(scores, test_labels), "train": len(train), "test": len(test),
             "k": args.k, "T": args.temperature}
    print(davis_metrics.format_table([table], tuple(table)))
    return {"scores": table, "data": report}


def run_linear(args, backbone, device) -> dict:
    train, train_labels, test, test_labels, num_classes, report = _train_test(args, backbone, device)
    head = knn_linear.train_linear_probe(train, train_labels, num_classes, args.epochs, args.batch_size,
                                         args.lr, args.seed)
    with torch.no_grad():
        table = {**knn_linear.topk_accuracy(head(test), test_labels), "train": len(train), "test": len(test),
                 "epochs": args.epochs}
    print(davis_metrics.format_table([table], tuple(table)))
    return {"scores": table, "data": report}


def run_discovery(args, backbone, device) -> dict:
    feature_fn = dense_feature_fn(backbone, args.layer)
    stride = feature_stride(backbone)
    sequences = open_sequences(args.data, subset=args.set, task="unsupervised")
    preset = label_prop.PRESETS["crw"]  # native size, floored to a multiple of the stride
    for sequence in sequences:
        first = sequence.mask(sequence.frame_stems[0])
        net_size = label_prop.network_size(*first.shape, preset, stride)
        feats = list(label_prop.sequence_features(sequence, feature_fn, net_size, args.batch, device))
        proposals = discovery.proposals_from_features(feats, args.proposals, first.shape, seed=args.seed)
        for stem, proposal in zip(sequence.frame_stems, proposals):
            write_mask(Path(args.out) / sequence.name / f"{stem}.png", proposal)
    scores = discovery.evaluate_discovery(sequences, args.out, lenient_per_frame=args.lenient_per_frame)
    table = davis_metrics.global_table(scores)
    protocol = ("LENIENT per-frame matching (SMTC code; not comparable with official numbers)"
                if args.lenient_per_frame else "official: one matching per sequence, <= 20 proposals")
    print(davis_metrics.format_table([table], davis_metrics.GLOBAL_COLUMNS))
    print(f"protocol: {protocol}")
    return {"protocol": protocol, "scores": table, "per_object": davis_metrics.per_object_table(scores)}


COMMANDS = {"labelprop": run_labelprop, "clusters": run_clusters, "knn": run_knn, "linear": run_linear,
            "discovery": run_discovery}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", help="run dir, its checkpoints/step-N folder, exported .safetensors, or "
                                       "DINO/DINOv2/timm/CRW checkpoint (required unless labelprop --features pixels)")
    common.add_argument("--arch", help="architecture (models.build name) when it cannot be inferred")
    common.add_argument("--data", required=True, help="dataset folder (see the command)")
    common.add_argument("--out", help="output folder (default <run>/eval/<command> or ./eval-<command>)")
    common.add_argument("--seed", type=int, default=1, help="k-means / probe seed")
    common.add_argument("--trust-pickle", action="store_true", help="allow pickled (non weights-only) .pth")
    defaults = argparse.ArgumentDefaultsHelpFormatter

    p = commands.add_parser("labelprop", parents=[common], formatter_class=defaults,
                            help="semi-supervised label propagation + DAVIS J&F (--data: DAVIS folder or eval shards)")
    p.add_argument("--set", default="val", help="DAVIS subset (ImageSets/2017/<set>.txt)")
    p.add_argument("--visualize", action="store_true", help="also write <out>/vis/<sequence>.png (strip) and .gif")
    p.add_argument("--no-score", action="store_true", help="only write the masks (sets without annotations)")
    p.add_argument("--features", default="backbone", choices=("backbone", "pixels"),
                   help="pixels: raw 8x8x3 pixel cells of the normalised frames instead of a network (no --ckpt): "
                        "the baseline a trained backbone has to beat")
    label_prop.add_propagation_args(p)

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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")

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
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
        if name == "knn":
            p.add_argument("--k", type=int, default=20, help="neighbours")
            p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T)")
        else:
            p.add_argument("--epochs", type=int, default=100, help="training epochs")
            p.add_argument("--batch-size", type=int, default=256, help="probe batch size")
            p.add_argument("--lr", type=float, default=0.001, help="base lr per 256 samples (SGD momentum 0.9, cosine)")

    p = commands.add_parser("discovery", parents=[common], formatter_class=defaults,
                            help="k-means object proposals scored on DAVIS-2017 unsupervised (official protocol)")
    p.add_argument("--set", default="val", help="DAVIS subset")
    p.add_argument("--proposals", type=int, default=8, help="proposals per sequence (official limit 20)")
    p.add_argument("--lenient-per-frame", action="store_true",
                   help="SMTC's lenient scoring: Hungarian matching per frame (NOT the official protocol)")
    p.add_argument("--layer", type=int, default=1, help="ViT block counted from the end")
    p.add_argument("--batch", type=int, default=8, help="frames per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
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
    pixels = getattr(args, "features", "backbone") == "pixels"
    args.out = Path(args.out) if args.out else default_out(args.ckpt, args.command)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    backbone = (PixelCells() if pixels else load_backbone(args.ckpt, args.arch, args.trust_pickle)).to(device)
    started = time.perf_counter()
    result = COMMANDS[args.command](args, backbone, device)
    result.update(command=args.command, ckpt=str(args.ckpt) if args.ckpt else "pixels", data=str(args.data),
                  seconds=time.perf_counter() - started)
    path = args.out / f"{args.command}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    try:
        main()
    except UsageError as err:
        sys.exit(fail(str(err)))
