"""Frozen-feature classification: weighted kNN (DINO's eval_knn) and a linear probe (DINO's eval_linear),
on frames drawn from labelled shards.

kNN: cosine similarity between L2-normalised descriptors; the k nearest training samples vote for their
class with weight exp(similarity / T); k = 20, T = 0.07 (DINO's reported setting).
Linear: a Linear layer (weights N(0, 0.01), bias 0) on frozen descriptors, SGD momentum 0.9, no weight
decay, lr = base_lr * batch / 256 with cosine decay to 0, cross-entropy. Deviation from DINO: descriptors
are computed once from resize-256 / centre-crop-224 frames (no random-resized-crop augmentation per epoch),
which is the usual cached-feature probe and is much cheaper.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)


@torch.inference_mode()
def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """(N_test, num_classes) summed exp(sim / T) votes of the k nearest training samples."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(test), chunk):  # bounded memory: chunk x N_train similarities at a time
        similarity, index = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = F.one_hot(train_labels[index], num_classes).float() * (similarity / temperature).exp()[..., None]
        scores.append(votes.sum(1))
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent (k larger than the class count counts as that count)."""
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"top{k}"] = 100.0 * (top == labels[:, None]).any(1).float().mean().item()
    return out


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 100,
                       batch_size: int = 256, base_lr: float = 0.001, seed: int = 0) -> nn.Linear:
    """Fit a linear classifier on frozen descriptors (N, D) (see the module docstring for the recipe)."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    lr = base_lr * batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, -(-len(features) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch, eta_min=0)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for start in range(0, len(features), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(head(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head


def center_crop_frames(frames: np.ndarray, resize: int = 256, crop: int = 224, resample=Image.BICUBIC) -> np.ndarray:
    """(T, H, W, 3) images or (T, H, W) masks -> centre crops of side `crop` after resizing the short side
    to `resize` (use ``Image.NEAREST`` for masks)."""
    out = []
    for frame in frames:
        image = Image.fromarray(frame)
        scale = resize / min(image.size)
        image = image.resize((max(crop, round(image.width * scale)), max(crop, round(image.height * scale))),
                             resample)
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        out.append(np.asarray(image.crop((left, top, left + crop, top + crop))))
    return np.stack(out)


def labelled_frames(dataset_dir: str | Path, frames_per_sample: int = 1, resize: int = 256, crop: int = 224
                    ) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Evenly spaced frames of every labelled sample in a shard folder, centre-cropped.
    Returns (images (N, crop, crop, 3) uint8, labels (N,), sample keys (N,), report). Unlabelled samples
    are skipped and counted in the report."""
    from shard_tools.cli import progress
    from shard_tools.manifest import load_manifest
    from shard_tools.reader import decode_frames, iter_samples, sample_meta

    images, labels, keys = [], [], []
    skipped = 0
    samples = load_manifest(dataset_dir)["samples"]
    for _, key, members in progress(iter_samples(dataset_dir), desc="decode", unit="sample", total=samples):
        meta, _ = sample_meta(members)
        if meta.get("label") is None:
            skipped += 1
            continue
        frames = decode_frames(members)
        picks = np.linspace(0, len(frames) - 1, frames_per_sample).round().astype(int)
        images.append(center_crop_frames(frames[picks], resize, crop))
        labels += [int(meta["label"])] * len(picks)
        keys += [key] * len(picks)
    if skipped:
        log.warning("%s: skipped %d unlabelled samples", dataset_dir, skipped)
    if not images:
        raise ValueError(f"{dataset_dir}: no labelled samples; pack with --labels CSV or class folders")
    return np.concatenate(images), np.array(labels), keys, {"skipped_unlabelled": skipped}


def split_by_sample(keys: list[str], labels: np.ndarray, every: int = 5) -> np.ndarray:
    """Deterministic held-out mask, stratified by class: within each class, every `every`-th distinct
    sample (all its frames) is a test sample (at least one per class when the class has two samples), so
    frames of one video never sit on both sides."""
    test = np.zeros(len(keys), dtype=bool)
    keys_array = np.array(keys)
    for label in np.unique(labels):
        distinct = sorted(set(keys_array[labels == label]))
        if len(distinct) < 2:
            continue
        chosen = set(distinct[every - 1::every]) or {distinct[-1]}
        test |= np.isin(keys_array, list(chosen))
    return test
