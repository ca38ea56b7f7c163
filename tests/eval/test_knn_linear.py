"""kNN votes, top-k accuracy, linear probe, held-out split, labelled frames from shards."""
import numpy as np
import pytest
import torch

from eval import knn_linear as kl


def test_knn_votes_hand_computed():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    scores = kl.knn_scores(train, labels, test, num_classes=2, k=2, temperature=0.5)
    # nearest two: sample 0 (cos 1.0, class 0) and sample 1 (cos 0.8, class 1)
    assert scores[0].tolist() == pytest.approx([np.exp(1.0 / 0.5), np.exp(0.8 / 0.5)])


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    labels = torch.tensor([2, 0])
    assert kl.topk_accuracy(scores, labels, ks=(1, 2)) == {"top1": 50.0, "top2": 100.0}


def blobs(n=200, classes=4, dim=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    centres = torch.randn(classes, dim, generator=generator) * 3
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def test_knn_classifies_blobs():
    features, labels = blobs(n=260)
    scores = kl.knn_scores(features[:200], labels[:200], features[200:], 4, chunk=16)
    assert kl.topk_accuracy(scores, labels[200:], ks=(1,))["top1"] > 95


def test_linear_probe_learns_and_is_deterministic():
    features, labels = blobs()
    head = kl.train_linear_probe(features, labels, 4, epochs=30, batch_size=32, base_lr=0.1)
    loss_before = torch.nn.functional.cross_entropy(torch.zeros(len(labels), 4), labels)
    with torch.no_grad():
        logits = head(features)
    assert torch.nn.functional.cross_entropy(logits, labels) < loss_before / 4
    assert (logits.argmax(1) == labels).float().mean() > 0.95
    again = kl.train_linear_probe(features, labels, 4, epochs=30, batch_size=32, base_lr=0.1)
    assert torch.equal(head.weight, again.weight)


def test_split_keeps_samples_whole_and_covers_classes():
    keys = [f"v{i // 2}" for i in range(20)]            # 10 samples of 2 frames
    labels = np.array([(i // 2) % 2 for i in range(20)])
    test = kl.split_by_sample(keys, labels, every=3)
    for key in set(keys):
        assert len({test[i] for i, k in enumerate(keys) if k == key}) == 1
    assert set(labels[test]) == {0, 1} and (~test).sum() > test.sum()


def test_labelled_frames_from_shards(jpeg_shards):
    images, labels, keys, report = kl.labelled_frames(jpeg_shards, frames_per_sample=2, resize=64, crop=48)
    assert images.shape == (12, 48, 48, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    assert report["skipped_unlabelled"] == 0 and len(set(keys)) == 6
