"""Unsupervised semantic segmentation by clustering patch features (TimeT / Leopart protocol).

Patch features -> standardised per dimension -> PCA to 50 dims -> bilinearly upsampled to the evaluation
size -> k-means (k-means++ init, best of several restarts) fitted on a seeded sample of those pixels ->
every pixel to its nearest centroid (the cluster map) -> matched to the ground truth -> mIoU.

Matching (Leopart's ``PredsmIoU``):
* ``hungarian`` (K = number of GT classes): one-to-one assignment maximising the summed IoU
  (``scipy.optimize.linear_sum_assignment`` on 1 - IoU); clusters left unmatched become background 0.
* ``many_to_one`` (over-clustering, K > classes): each cluster goes to the GT class that maximises its
  precision TP / (TP + FP) (or its IoU with ``precision_based=False``); several clusters may share a class.
Then IoU_c = TP / (TP + FP + FN) over all pixels of the evaluation unit, averaged over the GT classes
present (background included). Pixels labelled 255 (void) are left out.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

IGNORE_LABEL = 255


def standardise_and_project(features: torch.Tensor, dims: int = 50) -> torch.Tensor:
    """(N, D) -> (N, min(dims, D)): zero mean / unit variance per dimension, then PCA."""
    x = features.double()
    x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-12)
    dims = min(dims, x.shape[1])
    _, vectors = torch.linalg.eigh(x.T @ x)  # principal axes of the centred data, ascending variance
    return (x @ vectors[:, -dims:].flip(1)).float()


def _squared_distances(x: torch.Tensor, squared_norms: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, D) points (their (N, 1) squared norms) and (R, j, D) centroids -> (N, R, j) squared distances,
    from one matmul over every restart's centroids (a broadcast batched matmul would copy x R times)."""
    flat = centroids.reshape(-1, x.shape[1])
    distances = torch.addmm(squared_norms + (flat * flat).sum(1), x, flat.T, alpha=-2).clamp_min_(0)
    return distances.view(len(x), *centroids.shape[:2])


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, D) points, (k, D) centroids -> (N,) index of each point's nearest centroid."""
    x = x.float()
    return _squared_distances(x, (x * x).sum(1, keepdim=True), centroids[None]).argmin(2)[:, 0]


def kmeans(x: torch.Tensor, k: int, iterations: int = 50, restarts: int = 5, seed: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding, all restarts run together as one batch, until no
    assignment changes or ``iterations`` updates; the restart with the lowest inertia wins. Returns
    (labels (N,), centroids (k, D)). Deterministic for a seed."""
    if k > len(x):
        raise ValueError(f"k-means with k={k} needs at least k points, got {len(x)}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    dim = x.shape[1]
    squared_norms = (x * x).sum(1, keepdim=True)

    picks = torch.randint(len(x), (restarts,), generator=generator).to(x.device)
    centroids = x[picks][:, None]                                                   # (R, 1, D)
    nearest = _squared_distances(x, squared_norms, centroids)[..., 0]               # (N, R)
    for _ in range(1, k):  # k-means++: next centre drawn in proportion to the squared distance
        weights = nearest.T.cpu().double() + 1e-30  # (+tiny: duplicate points must not zero every weight)
        picks = torch.multinomial(weights, 1, generator=generator)[:, 0].to(x.device)
        centroids = torch.cat([centroids, x[picks][:, None]], dim=1)
        nearest = torch.minimum(nearest, _squared_distances(x, squared_norms, centroids[:, -1:])[..., 0])
    offsets = torch.arange(restarts, device=x.device) * k
    inertia, labels = _squared_distances(x, squared_norms, centroids).min(2)      # (N, R)
    for _ in range(iterations):
        # cluster sums as one matmul with the (N, R*k) membership matrix (index_add_ over the points is
        # several times slower on the CPU)
        members = torch.zeros(len(x), restarts * k, device=x.device).scatter_(1, labels + offsets, 1.0)
        sums = (members.T @ x).view(restarts, k, dim)
        counts = torch.bincount((labels + offsets).reshape(-1), minlength=restarts * k).view(restarts, k, 1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)  # empty: keep the centre
        inertia, updated = _squared_distances(x, squared_norms, centroids).min(2)
        converged = torch.equal(updated, labels)
        labels = updated
        if converged:
            break
    best = int(inertia.sum(0).argmin())
    return labels[:, best], centroids[best]


def cluster_feature_maps(maps: torch.Tensor, size: int, k: int, pca_dims: int = 50,
                         fit_points: int = 50_000, seed: int = 1) -> torch.Tensor:
    """TimeT's clustering of one evaluation unit: (T, D, h, w) patch features -> (T, size, size) cluster
    ids. Standardisation and PCA are fitted at patch level (both are affine, so they commute with the
    bilinear upsampling), the projected maps are upsampled to ``size``, k-means is fitted on
    ``fit_points`` of those pixels (spread evenly over the frames, drawn with ``seed``; 0: every pixel)
    and every pixel is then given its nearest centroid. The upsampled pixels are blends of a few patch
    vectors: on the demo data, fitting on a sample moves the mIoU less than changing the k-means seed
    does (docs/benchmarks.md, "Evaluation: clustering"), and faiss, which TimeT calls, fits on at most
    256 points per centroid and assigns the rest the same way. One frame is upsampled at a time."""
    frames, dim, h, w = maps.shape
    projected = standardise_and_project(maps.permute(0, 2, 3, 1).reshape(-1, dim), pca_dims)
    projected = projected.reshape(frames, h, w, -1).permute(0, 3, 1, 2)

    def pixels(t: int) -> torch.Tensor:  # frame t's upsampled pixels, (size * size, pca_dims)
        dense = F.interpolate(projected[t:t + 1], size=(size, size), mode="bilinear", align_corners=False)
        return dense[0].flatten(1).T

    per_frame = size * size
    quota = -(-fit_points // frames) if fit_points else per_frame
    if quota >= per_frame:
        fit = torch.cat([pixels(t) for t in range(frames)])
    else:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        fit = torch.cat([pixels(t)[torch.randperm(per_frame, generator=generator)[:quota].to(maps.device)]
                         for t in range(frames)])
    _, centroids = kmeans(fit, k, seed=seed)
    return torch.stack([nearest_centroid(pixels(t), centroids) for t in range(frames)]).view(frames, size, size)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_gt: int, num_pred: int) -> np.ndarray:
    """(num_gt, num_pred) pixel counts; GT pixels equal to 255 are skipped."""
    gt, pred = np.asarray(gt).ravel(), np.asarray(pred).ravel()
    keep = gt != IGNORE_LABEL
    return np.bincount(gt[keep].astype(np.int64) * num_pred + pred[keep], minlength=num_gt * num_pred
                       ).reshape(num_gt, num_pred)


def _iou_matrix(confusion: np.ndarray) -> np.ndarray:
    union = confusion.sum(1, keepdims=True) + confusion.sum(0, keepdims=True) - confusion
    return confusion / np.maximum(union, 1)


def hungarian_match(confusion: np.ndarray) -> np.ndarray:
    """Cluster -> class map (num_pred,) maximising the summed IoU; unmatched clusters map to 0."""
    rows, cols = linear_sum_assignment(1 - _iou_matrix(confusion))
    mapping = np.zeros(confusion.shape[1], dtype=np.int64)
    mapping[cols] = rows
    return mapping


def many_to_one_match(confusion: np.ndarray, precision_based: bool = True) -> np.ndarray:
    """Cluster -> class map (num_pred,): each cluster to its best class by precision (or IoU)."""
    if precision_based:
        score = confusion / np.maximum(confusion.sum(0, keepdims=True), 1)
    else:
        score = _iou_matrix(confusion)
    return score.argmax(0)


def miou(confusion: np.ndarray, mapping: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """mIoU over the GT classes present, after relabelling clusters with ``mapping``. Returns the mean
    and the per-class IoU (nan for classes absent from the GT)."""
    if mapping is not None:  # merge predicted columns that map to the same class
        merged = np.zeros((confusion.shape[0], confusion.shape[0]), dtype=confusion.dtype)
        np.add.at(merged.T, mapping, confusion.T)
        confusion = merged
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = confusion.sum(1) > 0
    per_class = np.where(present, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(per_class)), per_class


def gt_classes(gt: np.ndarray) -> np.ndarray:
    """The GT class ids present (sorted), void excluded."""
    gt = np.asarray(gt)
    return np.unique(gt[gt != IGNORE_LABEL])


def cluster_miou(labels: np.ndarray, gt: np.ndarray, k: int, overclustering: bool = False) -> dict:
    """Score one evaluation unit (a frame, a clip or a dataset): cluster ids 0..k-1 and GT labels of the
    same pixels, matched one-to-one (Hungarian) or, with ``overclustering``, many-to-one."""
    gt, labels = np.asarray(gt).ravel(), np.asarray(labels).ravel()
    classes = gt_classes(gt)
    if len(classes) == 0:
        raise ValueError("the evaluation unit has no labelled pixel")
    dense_gt = np.full_like(gt, IGNORE_LABEL, dtype=np.int64)  # GT ids -> 0..C-1 (keeps void)
    dense_gt[gt != IGNORE_LABEL] = np.searchsorted(classes, gt[gt != IGNORE_LABEL])
    confusion = confusion_matrix(dense_gt, labels, len(classes), k)
    mapping = many_to_one_match(confusion) if overclustering else hungarian_match(confusion)
    score, per_class = miou(confusion, mapping)
    return {"miou": score, "per_class_iou": dict(zip(classes.tolist(), per_class.tolist())), "k": k,
            "matching": "many-to-one (precision)" if overclustering else "hungarian"}
