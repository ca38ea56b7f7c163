"""The evaluation commands of eval/run.py, each ``run_<command>(args, backbone, device)`` -> (the result
written to ``<out>/<command>.json``, the headline of the summary line). Imported by eval/run.py only once
the command line has been checked, since importing torch takes seconds."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval import clustering, davis_metrics, discovery, knn_linear, label_prop, visualize
from eval.davis_io import open_sequences, read_mask, write_mask
from eval.features import (dense_feature_fn, dense_features, feature_stride, global_descriptor, pads_to_cover_frame,
                           slot_export, video_slots)
from models.io import load_smtc_slots
from eval.propagation_config import PRESETS, config_from_args
from shard_tools.cli import progress

# Discovery's frames: native size floored to a multiple of the stride, antialiased, ImageNet-normalised
DISCOVERY_INPUT = replace(PRESETS["crw"], resize="antialias")


def _batched(fn, items: np.ndarray, batch: int, device: torch.device, desc: str | None = None) -> torch.Tensor:
    """``fn`` over ``items``, ``batch`` at a time, concatenated; with ``desc``, a progress bar over the batches."""
    starts = range(0, len(items), batch)
    if desc:
        starts = progress(starts, desc=desc, unit="batch")
    return torch.cat([fn(torch.from_numpy(items[i:i + batch]).to(device)) for i in starts])


def run_labelprop(args, backbone, device) -> tuple[dict, str]:
    cfg = config_from_args(args)
    sequences = open_sequences(args.data, subset=args.set)
    timing = label_prop.propagate_sequences(progress(sequences, desc="labelprop", unit="seq"),
                                            dense_features(backbone, args.layer, cfg.upsample, cfg.final_norm),
                                            feature_stride(backbone), cfg, args.out, device, args.batch,
                                            pads=pads_to_cover_frame(backbone))
    result = {"protocol": args.protocol, "config": asdict(cfg), "timing": timing}
    if args.visualize:
        for sequence in progress(sequences, desc="visualize", unit="seq"):
            frames = [sequence.frame(i) for i in range(len(sequence.frames))]
            masks = [read_mask(Path(args.out) / sequence.name / f"{stem}.png") for stem in sequence.frame_stems]
            visualize.save_png(Path(args.out) / "vis" / f"{sequence.name}.png", visualize.overlay_strip(frames, masks))
            visualize.save_gif(Path(args.out) / "vis" / f"{sequence.name}.gif", frames, masks)
    print(f"{timing['frames']} frames at {timing['frames_per_second']:.2f} frames/s (protocol {args.protocol})")
    done = f"{len(sequences)} sequences, {timing['frames']} frames"
    if args.no_score:
        return result, f"{done}, masks only (--no-score)"
    scores = davis_metrics.evaluate_sequences(progress(sequences, desc="J&F", unit="seq"), args.out)
    davis_metrics.write_csvs(scores, args.out, args.set)
    result.update(scores=davis_metrics.global_table(scores), per_object=davis_metrics.per_object_table(scores))
    print(davis_metrics.format_table([result["scores"]], davis_metrics.GLOBAL_COLUMNS))
    return result, f"{done}, J&F-Mean {result['scores']['J&F-Mean']:.3f}"


def run_clusters(args, backbone, device) -> tuple[dict, str]:
    """TimeT's protocol: frames resized (short side) and centre-cropped to --size, patch features
    standardised + PCA-projected, upsampled to --eval-size, k-means per unit (fitted on --fit-points
    pixels, every pixel assigned), matched, mIoU averaged over units (clustering.cluster_feature_maps)."""
    stride = feature_stride(backbone)
    if args.size % stride:
        raise SystemExit(f"error: --size {args.size} is not a multiple of the backbone's patch size {stride}; "
                         f"use {args.size // stride * stride} or {(args.size // stride + 1) * stride}")
    feature_fn = dense_feature_fn(backbone, args.layer)
    units: list[tuple[list[torch.Tensor], list[np.ndarray]]] = []
    for sequence in progress(open_sequences(args.data, subset=args.set), desc="features", unit="seq"):
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
    for feats, masks in progress(units, desc="k-means", unit="unit"):
        gt = np.stack(masks)
        k = args.k or len(clustering.gt_classes(gt))
        labels = clustering.cluster_feature_maps(torch.stack(feats), args.eval_size, k, args.pca_dims,
                                                 args.fit_points, args.seed)
        results.append(clustering.cluster_miou(labels.cpu().numpy(), gt, k, args.overcluster))
    table = {"mIoU": float(np.mean([r["miou"] for r in results])), "units": len(results),
             "granularity": args.granularity, "matching": results[0]["matching"]}
    print(davis_metrics.format_table([table], ("mIoU", "units", "granularity", "matching")))
    return {"scores": table, "per_unit": [r["miou"] for r in results]}, f"{len(results)} units, mIoU {table['mIoU']:.3f}"


def _descriptors(args, backbone, device, data: str) -> tuple[torch.Tensor, np.ndarray, list[str], dict]:
    images, labels, keys, report = knn_linear.labelled_frames(data, args.frames_per_sample)
    fn = lambda x: global_descriptor(backbone, x, args.n_last_blocks, args.avgpool)  # noqa: E731
    return _batched(fn, images, args.batch, device, desc="descriptors"), labels, keys, report


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


def run_knn(args, backbone, device) -> tuple[dict, str]:
    train, train_labels, test, test_labels, num_classes, report = _train_test(args, backbone, device)
    scores = knn_linear.knn_scores(train, train_labels, test, num_classes, args.k, args.temperature)
    table = {**knn_linear.topk_accuracy(scores, test_labels), "train": len(train), "test": len(test),
             "k": args.k, "T": args.temperature}
    print(davis_metrics.format_table([table], tuple(table)))
    return {"scores": table, "data": report}, f"{len(test)} test images, top-1 {table['top1']:.1f} %"


def run_linear(args, backbone, device) -> tuple[dict, str]:
    train, train_labels, test, test_labels, num_classes, report = _train_test(args, backbone, device)
    head = knn_linear.train_linear_probe(train, train_labels, num_classes, args.epochs, args.batch_size,
                                         args.lr, args.seed)
    with torch.no_grad():
        table = {**knn_linear.topk_accuracy(head(test), test_labels), "train": len(train), "test": len(test),
                 "epochs": args.epochs}
    print(davis_metrics.format_table([table], tuple(table)))
    return {"scores": table, "data": report}, f"{len(test)} test images, top-1 {table['top1']:.1f} %"


def discovery_source(args) -> str:
    """Where discovery's proposals come from: --proposals-from, else the run's slots when it exported them."""
    return args.proposals_from or ("slots" if slot_export(args.ckpt) else "features")


def slot_proposer(args, backbone, device):
    """Proposals from the slot head an SMTC run exported: (propose(sequence, net_size, size) -> (T, H, W)
    ids and the (slot, instance) pair of each id, settings for the json, the start line)."""
    slots_file = slot_export(args.ckpt)
    min_similarity = discovery.MIN_SLOT_SIMILARITY if args.min_similarity is None else args.min_similarity
    mask_threshold = discovery.MASK_THRESHOLD if args.mask_threshold is None else args.mask_threshold
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
        return discovery.proposals_from_slots(outputs, grid, args.proposals, size, min_similarity,
                                              mask_threshold)

    candidates = settings["num_slots"] * settings["num_instances"]
    details = {"slots": str(slots_file), "iters": args.slot_iters, "clip_frames": clip_len, "candidates": candidates,
               "min_similarity": min_similarity, "mask_threshold": mask_threshold}
    start = (f"discovery: proposals from the slots of {slots_file} ({candidates} instance slots, {args.slot_iters} "
             f"iterations, clips of {clip_len} frames, cos >= {min_similarity}; the {args.proposals} largest "
             "per sequence)")
    return propose, details, start


def feature_proposer(args, backbone, device):
    """Proposals from one k-means of a sequence's patch features; returned as :func:`slot_proposer`'s."""
    features = dense_features(backbone, args.layer)

    def propose(sequence, net_size, size):
        feats = list(label_prop.sequence_features(sequence, features, net_size, args.batch, device, DISCOVERY_INPUT))
        return discovery.proposals_from_features(feats, args.proposals, size, seed=args.seed), None

    start = f"discovery: proposals from k-means of the backbone features ({args.proposals} per sequence)"
    return propose, {"layer": args.layer}, start


def run_discovery(args, backbone, device) -> tuple[dict, str]:
    """Proposals per sequence (from ``discovery_source``), written as PNGs and scored. Frames go in at their
    native size floored to the patch and ImageNet-normalised, as in training (SMTC's script squashes them
    to 480 x 800 and normalises with Kinetics statistics)."""
    stride = feature_stride(backbone)
    sequences = open_sequences(args.data, subset=args.set, task="unsupervised")
    source = discovery_source(args)
    propose, details, start = (slot_proposer if source == "slots" else feature_proposer)(args, backbone, device)
    print(start)
    identities = {}
    for sequence in progress(sequences, desc="discovery", unit="seq"):
        first = sequence.mask(sequence.frame_stems[0])
        net_size = label_prop.network_size(*first.shape, DISCOVERY_INPUT, stride)
        proposals, identities[sequence.name] = propose(sequence, net_size, first.shape)
        for stem, proposal in zip(sequence.frame_stems, proposals):
            write_mask(Path(args.out) / sequence.name / f"{stem}.png", proposal)
    scores = discovery.evaluate_discovery(progress(sequences, desc="J&F", unit="seq"), args.out,
                                          lenient_per_frame=args.lenient_per_frame)
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
    return result, f"{len(sequences)} sequences, J&F-Mean {table['J&F-Mean']:.3f} (proposals from {source})"


COMMANDS = {"labelprop": run_labelprop, "clusters": run_clusters, "knn": run_knn, "linear": run_linear,
            "discovery": run_discovery}
