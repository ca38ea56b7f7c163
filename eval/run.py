"""Evaluate a backbone: label propagation (DAVIS J&F), clustering mIoU, kNN, linear probe, object discovery.

    python eval/run.py labelprop --ckpt RUN --data DAVIS_OR_EVAL_SHARDS [--protocol dino|crw]
    python eval/run.py labelprop --features pixels --data DAVIS_OR_EVAL_SHARDS   (raw-pixel baseline)
    python eval/run.py clusters  --ckpt RUN --data DAVIS_OR_EVAL_SHARDS [--granularity frame|clip|dataset]
    python eval/run.py knn       --ckpt RUN --data LABELLED_SHARDS [--val-data LABELLED_SHARDS]
    python eval/run.py linear    --ckpt RUN --data LABELLED_SHARDS [--val-data LABELLED_SHARDS]
    python eval/run.py discovery --ckpt RUN --data DAVIS_UNSUPERVISED [--proposals 8] [--proposals-from slots|features]

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
import torch.nn.functional as F
from PIL import Image

from eval import clustering, davis_metrics, discovery, knn_linear, label_prop, visualize
from eval.davis_io import open_sequences, read_mask, write_mask
from eval.features import (SLOTS_FILE, PixelCells, dense_feature_fn, feature_stride, global_descriptor, load_backbone,
                           slot_export, video_slots)
from models.io import load_smtc_slots
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
    standardised + PCA-projected (at patch level; both are affine so they commute with the bilinear
    upsampling), upsampled to --eval-size, k-means per unit, matched, mIoU averaged over units."""
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
        stack = torch.stack(feats)                                               # (T, D, h, w)
        frames, dim, h, w = stack.shape
        projected = clustering.standardise_and_project(stack.permute(0, 2, 3, 1).reshape(-1, dim), args.pca_dims)
        projected = projected.reshape(frames, h, w, -1).permute(0, 3, 1, 2)
        dense = F.interpolate(projected, size=(args.eval_size,) * 2, mode="bilinear", align_corners=False)
        points = dense.permute(0, 2, 3, 1).reshape(-1, projected.shape[1])
        results.append(clustering.cluster_miou(points, np.stack(masks), k=args.k,
                                               overclustering=args.overcluster, pca_dims=0, seed=args.seed))
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


def discovery_source(args) -> str:
    """Where discovery's proposals come from: --proposals-from, else the run's slots when it exported them."""
    return args.proposals_from or ("slots" if slot_export(args.ckpt) else "features")


def slot_proposer(args, backbone, device):
    """Proposals from the slot head an SMTC run exported: (propose(sequence, net_size, size) -> (T, H, W)
    ids and the (slot, instance) pair of each id, settings for the json, the start line)."""
    slots_file = slot_export(args.ckpt)
    network, settings = load_smtc_slots(slots_file, backbone, iters=args.slot_iters)
    network.to(device)
    clip_len = args.clip_frames or settings["clip_len"]
    stride = feature_stride(backbone)
    # One seeded instance draw for the whole evaluation: instance p of slot s starts alike in every frame
    noise = torch.randn((settings["num_slots"], settings["num_instances"], settings["dim"]),
                        generator=torch.Generator().manual_seed(args.seed))

    def propose(sequence, net_size, size):
        frames = torch.cat(list(label_prop.sequence_frames(sequence, net_size, args.batch, device)))
        outputs = video_slots(network, frames, clip_len, noise, max(1, args.batch // clip_len))
        grid = (net_size[0] // stride, net_size[1] // stride)
        return discovery.proposals_from_slots(outputs, grid, args.proposals, size, args.min_similarity,
                                              args.mask_threshold)

    candidates = settings["num_slots"] * settings["num_instances"]
    details = {"slots": str(slots_file), "iters": args.slot_iters, "clip_frames": clip_len, "candidates": candidates,
               "min_similarity": args.min_similarity, "mask_threshold": args.mask_threshold}
    start = (f"discovery: proposals from the slots of {slots_file} ({candidates} instance slots, {args.slot_iters} "
             f"iterations, clips of {clip_len} frames, cos >= {args.min_similarity}; the {args.proposals} largest "
             "per sequence)")
    return propose, details, start


def feature_proposer(args, backbone, device):
    """Proposals from one k-means of a sequence's patch features; returned as :func:`slot_proposer`'s."""
    feature_fn = dense_feature_fn(backbone, args.layer)

    def propose(sequence, net_size, size):
        feats = list(label_prop.sequence_features(sequence, feature_fn, net_size, args.batch, device))
        return discovery.proposals_from_features(feats, args.proposals, size, seed=args.seed), None

    start = f"discovery: proposals from k-means of the backbone features ({args.proposals} per sequence)"
    return propose, {"layer": args.layer}, start


def run_discovery(args, backbone, device) -> dict:
    """Proposals per sequence (from ``discovery_source``), written as PNGs and scored. Frames go in at their
    native size floored to the patch and ImageNet-normalised, as in training (SMTC's script squashes them
    to 480 x 800 and normalises with Kinetics statistics)."""
    stride = feature_stride(backbone)
    sequences = open_sequences(args.data, subset=args.set, task="unsupervised")
    preset = label_prop.PRESETS["crw"]  # native size, floored to a multiple of the stride
    source = discovery_source(args)
    propose, details, start = (slot_proposer if source == "slots" else feature_proposer)(args, backbone, device)
    print(start)
    identities = {}
    for sequence in sequences:
        first = sequence.mask(sequence.frame_stems[0])
        net_size = label_prop.network_size(*first.shape, preset, stride)
        proposals, identities[sequence.name] = propose(sequence, net_size, first.shape)
        for stem, proposal in zip(sequence.frame_stems, proposals):
            write_mask(Path(args.out) / sequence.name / f"{stem}.png", proposal)
    scores = discovery.evaluate_discovery(sequences, args.out, lenient_per_frame=args.lenient_per_frame)
    table = davis_metrics.global_table(scores)
    protocol = ("LENIENT per-frame matching (SMTC code; not comparable with official numbers)"
                if args.lenient_per_frame else "official: one matching per sequence, <= 20 proposals")
    print(davis_metrics.format_table([{**table, "proposals": source}], (*davis_metrics.GLOBAL_COLUMNS, "proposals")))
    print(f"protocol: {protocol}; proposals from {source}")
    result = {"protocol": protocol, "proposals_from": source,
              "proposal_settings": {**details, "max_proposals": args.proposals}, "scores": table,
              "per_object": davis_metrics.per_object_table(scores)}
    if source == "slots":  # the (slot, instance) pair behind each id 1..K of a sequence's PNGs
        result["proposal_slots"] = identities
    return result


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
    common.add_argument("--seed", type=int, default=1, help="k-means / probe seed (discovery: and the slots' "
                                                             "instance draw)")
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
    p.add_argument("--min-similarity", type=float, default=discovery.MIN_SLOT_SIMILARITY,
                   help="slots: an instance is a candidate where cos(semantic slot, instance slot) >= this")
    p.add_argument("--mask-threshold", type=float, default=discovery.MASK_THRESHOLD,
                   help="slots: a pixel is background where its proposal's mask is below this fraction of its "
                        "min-max range in the frame")
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
    if args.command == "discovery" and args.proposals_from == "slots" and not slot_export(args.ckpt):
        raise UsageError(f"--proposals-from slots: {args.ckpt} holds no {SLOTS_FILE}; pass the folder of an SMTC "
                         "run (or its checkpoints/step-N or init/), or use --proposals-from features")
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
