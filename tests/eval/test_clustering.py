"""Clustering mIoU: matching against brute force, separable features, many-to-one, k-means."""
import itertools

import numpy as np
import pytest
import torch

from eval import clustering as cl


def brute_force_best_iou_sum(confusion):
    """Best summed IoU over every one-to-one assignment of clusters to classes (square case)."""
    union = confusion.sum(1, keepdims=True) + confusion.sum(0, keepdims=True) - confusion
    iou = confusion / np.maximum(union, 1)
    n = len(confusion)
    return max(sum(iou[g, p] for g, p in enumerate(perm)) for perm in itertools.permutations(range(n)))


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    confusion = rng.integers(0, 50, size=(5, 5))
    mapping = cl.hungarian_match(confusion)
    union = confusion.sum(1, keepdims=True) + confusion.sum(0, keepdims=True) - confusion
    iou = confusion / np.maximum(union, 1)
    assert sorted(mapping) == list(range(5))  # one-to-one
    assert sum(iou[mapping[p], p] for p in range(5)) == pytest.approx(brute_force_best_iou_sum(confusion))


def test_miou_hand_computed():
    gt = np.array([0, 0, 0, 1, 1, 2, 2, 2, 255])
    pred = np.array([1, 1, 0, 0, 0, 2, 2, 1, 0])
    confusion = cl.confusion_matrix(gt, pred, 3, 3)
    score, per_class = cl.miou(confusion)  # identity mapping
    # class 0: TP 1, FP 2, FN 2 -> 1/5; class 1: TP 0 -> 0; class 2: TP 2, FP 0, FN 1 -> 2/3
    assert per_class == pytest.approx([1 / 5, 0.0, 2 / 3])
    assert score == pytest.approx((1 / 5 + 2 / 3) / 3)


def separable_image(classes=3, size=24, dim=16, seed=0):
    """Per-pixel features: class-specific means far apart plus small noise; labels permuted later."""
    generator = torch.Generator().manual_seed(seed)
    gt = np.repeat(np.arange(classes), size * size // classes)
    means = torch.randn(classes, dim, generator=generator) * 5
    features = means[torch.from_numpy(gt)] + 0.05 * torch.randn(len(gt), dim, generator=generator)
    return features, gt


def test_separable_features_give_miou_one():
    features, gt = separable_image()
    labels, _ = cl.kmeans(features, 3)
    result = cl.cluster_miou(labels.numpy(), gt * 3, k=3)  # ids 0, 3, 6: arbitrary GT ids
    assert result["k"] == 3
    assert result["miou"] == pytest.approx(1.0)


def test_overclustering_many_to_one_gives_miou_one():
    features, gt = separable_image(classes=2)
    labels = cl.kmeans(features, 6)[0].numpy()
    assert cl.cluster_miou(labels, gt, k=6, overclustering=True)["miou"] == pytest.approx(1.0)
    # with a one-to-one matching, the extra clusters are wrong (mapped to background)
    assert cl.cluster_miou(labels, gt, k=6)["miou"] < 1.0


def two_region_maps(frames=3, dim=8, grid=6, seed=0):
    """(T, D, h, w) patch features: the left and right halves of every frame have distinct means."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(2, dim, generator=generator) * 5
    side = (torch.arange(grid) >= grid // 2).long().expand(grid, grid)        # 0 left, 1 right
    maps = means[side].permute(2, 0, 1).expand(frames, -1, -1, -1)
    return maps + 0.05 * torch.randn(frames, dim, grid, grid, generator=generator), side


def test_cluster_feature_maps_with_every_pixel_is_kmeans_of_the_upsampled_projection():
    maps, _ = two_region_maps()
    labels = cl.cluster_feature_maps(maps, 12, k=2, pca_dims=4, fit_points=0, seed=3)
    projected = cl.standardise_and_project(maps.permute(0, 2, 3, 1).reshape(-1, 8), 4)
    dense = torch.nn.functional.interpolate(projected.reshape(3, 6, 6, 4).permute(0, 3, 1, 2), size=(12, 12),
                                            mode="bilinear", align_corners=False)
    expected, _ = cl.kmeans(dense.permute(0, 2, 3, 1).reshape(-1, 4), 2, seed=3)
    assert labels.shape == (3, 12, 12)
    assert torch.equal(labels.reshape(-1), expected)


def test_cluster_feature_maps_fitted_on_a_sample_is_seeded_and_labels_every_pixel():
    maps, side = two_region_maps()
    gt = np.repeat(side.numpy(), 4, axis=1).repeat(4, axis=0)[None].repeat(3, axis=0)   # (3, 24, 24)
    sampled = cl.cluster_feature_maps(maps, 24, k=2, pca_dims=4, fit_points=60, seed=1)  # 20 of 576 per frame
    assert torch.equal(sampled, cl.cluster_feature_maps(maps, 24, k=2, pca_dims=4, fit_points=60, seed=1))
    assert cl.cluster_miou(sampled.numpy(), gt, k=2)["miou"] == pytest.approx(1.0)


def test_many_to_one_uses_precision():
    confusion = np.array([[10, 0, 3],
                          [0, 10, 7]])   # cluster 2: precision 0.3 for class 0, 0.7 for class 1
    assert list(cl.many_to_one_match(confusion)) == [0, 1, 1]


def test_kmeans_is_deterministic_and_recovers_blobs():
    features, gt = separable_image(classes=4, dim=8, seed=2)
    labels_a, _ = cl.kmeans(features, 4, seed=3)
    labels_b, _ = cl.kmeans(features, 4, seed=3)
    assert torch.equal(labels_a, labels_b)
    confusion = cl.confusion_matrix(gt, labels_a.numpy(), 4, 4)
    assert (confusion > 0).sum() == 4  # every blob is exactly one cluster


def test_pca_keeps_the_dominant_axes():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=generator) * torch.tensor([1.0, 10.0, 0.1])
    projected = cl.standardise_and_project(torch.cat([x, x[:, :1] * 2], 1), dims=2)
    assert projected.shape == (500, 2)
    # after standardisation, columns 0 and 3 are identical, so the first component carries 2 units
    assert projected[:, 0].var() == pytest.approx(2.0, rel=0.05)
