"""Unsupervised multi-object discovery on DAVIS-2017-unsupervised, scored with the official protocol.

Official (default): a prediction is a palette PNG per frame with at most 20 proposal ids that keep their
identity over time; void pixels are ignored, every frame is scored, and proposals are matched to GT
objects **once per sequence** (Hungarian on the frame-averaged (J + F) / 2), then J&F as usual.

``lenient_per_frame`` reproduces what SMTC's shipped evaluation does instead (up to 300 proposals and a
new Hungarian matching in **every frame** on J + F, so identities need not be consistent). It is more
lenient and its numbers are **not comparable** with officially scored ones; reports label it as such.

Proposals for a plain backbone (no slot head): one k-means over all patch features of a sequence, so a
cluster id is the same object proposal in every frame.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from eval.clustering import kmeans, standardise_and_project
from eval.davis_io import VOID_LABEL, Sequence
from eval.davis_metrics import SequenceScores, load_sequence_masks, pairwise_scores, score_unsupervised

OFFICIAL_MAX_PROPOSALS = 20
LENIENT_MAX_PROPOSALS = 300


def score_lenient_per_frame(name: str, gt_labels: np.ndarray, pred_labels: np.ndarray,
                            max_proposals: int = LENIENT_MAX_PROPOSALS) -> SequenceScores:
    """SMTC-style (lenient, not the official protocol): Hungarian matching redone in every frame on J + F."""
    void = gt_labels == VOID_LABEL
    num_gt = int(np.where(void, 0, gt_labels)[0].max())
    num_proposals = int(pred_labels.max()) if pred_labels.size else 0
    if num_proposals > max_proposals:
        raise ValueError(f"sequence {name}: {num_proposals} proposals, more than {max_proposals}")
    j, f = pairwise_scores(gt_labels, pred_labels, num_gt, max(num_proposals, num_gt), void)
    matched_j = np.zeros((num_gt, len(gt_labels)))
    matched_f = np.zeros_like(matched_j)
    for t in range(len(gt_labels)):
        rows, cols = linear_sum_assignment(-(j[:, :, t] + f[:, :, t]))
        matched_j[cols, t], matched_f[cols, t] = j[rows, cols, t], f[rows, cols, t]
    return SequenceScores(name, matched_j, matched_f)


def evaluate_discovery(sequences: Iterable[Sequence], results_dir, lenient_per_frame: bool = False
                       ) -> list[SequenceScores]:
    """Score a results folder of proposal PNGs against unsupervised GT (all frames, voids ignored)."""
    scores = []
    for sequence in sequences:
        gt, pred, _ = load_sequence_masks(sequence, Path(results_dir), task="unsupervised")
        if lenient_per_frame:
            scores.append(score_lenient_per_frame(sequence.name, gt, pred))
        else:
            scores.append(score_unsupervised(sequence.name, gt, pred, OFFICIAL_MAX_PROPOSALS)[0])
    return scores


def proposals_from_features(features: list[torch.Tensor], num_proposals: int, size: tuple[int, int],
                            pca_dims: int = 50, seed: int = 1) -> np.ndarray:
    """(D, h, w) feature maps of one sequence -> (T, H, W) uint8 proposal ids 1..num_proposals, from one
    k-means over the whole sequence (temporally consistent ids); cluster maps are nearest-upsampled."""
    if not 1 <= num_proposals <= OFFICIAL_MAX_PROPOSALS:
        raise ValueError(f"num_proposals must be 1..{OFFICIAL_MAX_PROPOSALS} for the official protocol")
    stack = torch.stack(features)                                     # (T, D, h, w)
    frames, dim, h, w = stack.shape
    points = stack.permute(0, 2, 3, 1).reshape(-1, dim)
    labels, _ = kmeans(standardise_and_project(points, pca_dims), num_proposals, seed=seed)
    maps = labels.reshape(frames, 1, h, w).float() + 1
    return F.interpolate(maps, size=size, mode="nearest-exact")[:, 0].byte().cpu().numpy()
