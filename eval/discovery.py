"""Unsupervised multi-object discovery on DAVIS-2017-unsupervised, scored with the official protocol.

Official (default): a prediction is a palette PNG per frame with at most 20 proposal ids that keep their
identity over time; void pixels are ignored, every frame is scored, and proposals are matched to GT
objects **once per sequence** (Hungarian on the frame-averaged (J + F) / 2), then J&F as usual.

``lenient_per_frame`` reproduces what SMTC's shipped evaluation does instead (up to 300 proposals and a
new Hungarian matching in **every frame** on J + F, so identities need not be consistent). It is more
lenient and its numbers are **not comparable** with officially scored ones; reports label it as such.

Proposals for a plain backbone (no slot head): one k-means over all patch features of a sequence, so a
cluster id is the same object proposal in every frame.

Proposals from SMTC's slots (a run that exported ``slots.safetensors``): SMTC's inference path gives
every frame S x P instance masks (semantic softmax over slots x instance softmax over the slot's P
instances); the instance slots whose cosine with their semantic slot is >= 0.5 are that frame's
candidates (as SMTC's src/eval_multi.py keeps them). The instance draw is the same in every frame, so a (slot, instance)
pair is one proposal through the sequence; the ``num_proposals`` pairs with the largest mask area over
the sequence are kept, and each pixel goes to the kept proposal whose (bilinearly upsampled) mask is
largest there, or to the background where that mask is below ``threshold`` of its min-max range in
the frame (SMTC's scorer binarises its min-max normalised masks at 0.3).
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
from models.slots import semantic_instance_cosine, slot_masks

OFFICIAL_MAX_PROPOSALS = 20
LENIENT_MAX_PROPOSALS = 300
# SMTC's evaluation keeps an instance when cos(semantic slot, instance slot) >= 0.5 (src/eval_multi.py) and
# its scorer binarises each min-max normalised mask at 0.3 (its copy of davis2017/results.py).
MIN_SLOT_SIMILARITY = 0.5
MASK_THRESHOLD = 0.3


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


def check_proposal_count(num_proposals: int) -> None:
    """The official protocol scores at most 20 proposal ids per sequence."""
    if not 1 <= num_proposals <= OFFICIAL_MAX_PROPOSALS:
        raise ValueError(f"num_proposals must be 1..{OFFICIAL_MAX_PROPOSALS} for the official protocol")


def proposals_from_features(features: list[torch.Tensor], num_proposals: int, size: tuple[int, int],
                            pca_dims: int = 50, seed: int = 1) -> np.ndarray:
    """(D, h, w) feature maps of one sequence -> (T, H, W) uint8 proposal ids 1..num_proposals, from one
    k-means over the whole sequence (temporally consistent ids); cluster maps are nearest-upsampled."""
    check_proposal_count(num_proposals)
    stack = torch.stack(features)                                     # (T, D, h, w)
    frames, dim, h, w = stack.shape
    points = stack.permute(0, 2, 3, 1).reshape(-1, dim)
    labels, _ = kmeans(standardise_and_project(points, pca_dims), num_proposals, seed=seed)
    maps = labels.reshape(frames, 1, h, w).float() + 1
    return F.interpolate(maps, size=size, mode="nearest-exact")[:, 0].byte().cpu().numpy()


def slot_candidates(semantic_logits: torch.Tensor, instance_logits: torch.Tensor, semantic_slots: torch.Tensor,
                    instance_slots: torch.Tensor, min_similarity: float = MIN_SLOT_SIMILARITY
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame slot outputs of a sequence -> the candidates of every frame: (T, S*P, N) instance masks
    and a (T, S*P) bool mask of the valid ones (cos(semantic, instance) >= ``min_similarity``).

    Inputs as ``models.slots.SMTCSlots`` returns them without the batch dimension: semantic_logits
    (T, S, N), instance_logits (T, S, P, N), semantic_slots (T, S, D), instance_slots (T, S, P, D).
    Candidate c is instance c % P of slot c // P.
    """
    _, masks = slot_masks(semantic_logits, instance_logits)                           # (T, S, P, N)
    valid = semantic_instance_cosine(semantic_slots, instance_slots) >= min_similarity
    return masks.flatten(1, 2), valid.flatten(1)


def select_by_area(masks: torch.Tensor, valid: torch.Tensor, num_proposals: int) -> torch.Tensor:
    """Ids of at most ``num_proposals`` candidates, largest first, by mask area summed over the frames
    where each is valid; candidates never valid are never chosen. masks (T, C, N), valid (T, C) -> (K,).

    Area over the whole sequence, because the official protocol matches one proposal to a GT object for
    all frames: a candidate that covers a region in many frames can score there, one that is valid in a
    few frames, or only on a few cells, cannot. (Mask sums are soft areas: the masks of a cell sum to 1
    over all S*P candidates.)
    """
    check_proposal_count(num_proposals)
    area = (masks.sum(-1) * valid).sum(0)                                             # (C,)
    order = area.argsort(descending=True, stable=True)[:num_proposals]
    return order[area[order] > 0]


def proposal_maps(masks: torch.Tensor, valid: torch.Tensor, chosen: torch.Tensor, grid: tuple[int, int],
                  size: tuple[int, int], threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """(T, H, W) uint8 maps: pixel -> 1 + its position in ``chosen``, or 0 (background).

    masks (T, C, h*w) and valid (T, C) from :func:`slot_candidates`; ``chosen`` (K,) candidate ids (the
    proposal ids 1..K follow its order). Per frame, the chosen masks that are valid there are bilinearly
    upsampled from ``grid`` to ``size``; a pixel goes to the largest of them, unless that mask is below
    ``threshold`` of its own min-max range in the frame (or zero), when it is background. One id per
    pixel, as the official protocol wants, where SMTC's scorer lets its binarised masks overlap.
    """
    frames = masks.shape[0]
    maps = np.zeros((frames, *size), np.uint8)
    if len(chosen) == 0:
        return maps
    for t in range(frames):
        soft = (masks[t, chosen] * valid[t, chosen, None]).float().view(1, len(chosen), *grid)
        up = F.interpolate(soft, size=size, mode="bilinear", align_corners=False)[0]   # (K, H, W)
        low, high = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
        relative = (up - low) / (high - low).clamp_min(1e-12)
        best, winner = up.max(0)
        inside = (relative.gather(0, winner[None])[0] >= threshold) & (best > 0)
        maps[t] = torch.where(inside, winner + 1, 0).byte().cpu().numpy()
    return maps


def proposals_from_slots(outputs: dict[str, torch.Tensor], grid: tuple[int, int], num_proposals: int,
                         size: tuple[int, int], min_similarity: float = MIN_SLOT_SIMILARITY,
                         threshold: float = MASK_THRESHOLD) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Per-frame slot outputs of one sequence (``semantic_logits``, ``instance_logits``, ``semantic_slots``,
    ``instance_slots`` as in :func:`slot_candidates`, on the token ``grid``) -> (T, H, W) uint8 proposal
    maps (ids 1..K consistent over the sequence, 0 background) and the (slot, instance) pair of each id."""
    masks, valid = slot_candidates(outputs["semantic_logits"], outputs["instance_logits"],
                                   outputs["semantic_slots"], outputs["instance_slots"], min_similarity)
    chosen = select_by_area(masks, valid, num_proposals)
    instances = outputs["instance_logits"].shape[-2]
    pairs = [(int(c) // instances, int(c) % instances) for c in chosen]
    return proposal_maps(masks, valid, chosen, grid, size, threshold), pairs
