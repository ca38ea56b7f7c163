"""Label propagation: the tiled kernel against a dense definition, DINO's way, and a tracking video."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.bench_label_prop import dino_style_propagation, synthetic_video
from eval.davis_metrics import evaluate_folder, global_table, region_similarity
from eval.davis_io import DavisFolder
from eval.label_prop import (Propagator, _top_candidates, first_frame_labels, network_size, propagate_sequences,
                             propagate_video)
from eval.propagation_config import PRESETS


def dense_reference(features, first_labels, cfg):
    """Propagation written directly from its definition: full affinity to every context cell, masks,
    joint top-k, softmax. Context of frame t: frame 0 + frames t-n..t-1 (CRW: indices < 0 are frame 0)."""
    dim, h, w = features[0].shape
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    di = ii.reshape(-1, 1) - ii.reshape(1, -1)
    dj = jj.reshape(-1, 1) - jj.reshape(1, -1)
    if cfg.neighbourhood == "square":
        inside = (di.abs() <= cfg.radius) & (dj.abs() <= cfg.radius)
    else:
        inside = di ** 2 + dj ** 2 < cfg.radius ** 2
    labels = [first_labels]
    for t in range(1, len(features)):
        previous = range(t - cfg.context, t)
        previous = [max(s, 0) for s in previous] if cfg.pad_with_first else [s for s in previous if s >= 1]
        context = [0] + previous
        scores, values = [], []
        query = features[t].reshape(dim, -1).T
        for position, s in enumerate(context):
            a = query @ features[s].reshape(dim, -1)
            if position > 0 or cfg.restrict_first:
                a = a.masked_fill(~inside, float("-inf"))
            scores.append(a)
            values.append(labels[s].reshape(len(first_labels), -1).T)
        scores = torch.cat(scores, 1)
        top, index = scores.topk(min(cfg.topk, scores.shape[1]), dim=1)
        soft = torch.einsum("qk,qkc->qc", torch.softmax(top / cfg.temperature, 1), torch.cat(values)[index])
        labels.append(soft.T.reshape(-1, h, w))
    return labels[1:]


def random_video(frames=6, grid=(9, 11), dim=16, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    feats = [F.normalize(torch.randn(dim, *grid, generator=generator), dim=0) for _ in range(frames)]
    ids = torch.randint(0, classes, grid, generator=generator)
    return feats, F.one_hot(ids, classes).permute(2, 0, 1).float()


@pytest.mark.parametrize("preset", ["dino", "crw"])
@pytest.mark.parametrize("tile, grid, topk", [(1, (9, 11), 4), (4, (9, 11), 4), (32, (9, 11), 4), (2, (2, 2), 6)])
def test_tiled_kernel_equals_dense_definition(preset, tile, grid, topk):
    feats, labels = random_video(grid=grid)
    cfg = replace(PRESETS[preset], tile=tile, radius=3.0, context=3, topk=topk)
    propagator = Propagator(feats[0], labels, cfg)
    ours = [propagator.step(f) for f in feats[1:]]
    expected = dense_reference(feats, labels, cfg)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # soft labels stay a distribution over classes
    torch.testing.assert_close(ours[-1].sum(0), torch.ones(ours[-1].shape[1:]))


@pytest.mark.parametrize("k", [1, 5, 13, 200])
def test_row_max_top_candidates_equal_plain_topk(k):
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 7, 4, 6, generator=generator)
    scores[:, :, 1:3, 2:] = float("-inf")   # masked cells
    scores[1:, :, 0] = float("-inf")        # fully masked rows; k = 13 and 200 exceed the 12 rows / 72 cells
    top, index = _top_candidates(scores, k)
    flat = scores.permute(1, 0, 2, 3).reshape(7, -1)
    expected, _ = flat.topk(min(k, flat.shape[1]), dim=1)
    assert torch.equal(top, expected)
    assert torch.equal(flat.gather(1, index), top)  # the positions point at the values


def test_dino_preset_matches_dino_style_baseline():
    feats, first_mask = synthetic_video(6, (12, 20), 32, (96, 160), seed=3)
    cfg = replace(PRESETS["dino"], tile=5)
    expected_soft, expected_masks = dino_style_propagation(feats, first_mask, stride=8)
    propagator = Propagator(feats[0], first_frame_labels(first_mask, (12, 20), "nearest"), cfg)
    for feature, soft in zip(feats[1:], expected_soft):
        torch.testing.assert_close(propagator.step(feature), soft, rtol=1e-4, atol=1e-5)
    ours = list(propagate_video(feats, first_mask, first_mask.shape, cfg, stride=8))
    assert np.mean([(a == b).mean() for a, b in zip(ours, expected_masks)]) > 0.999


def translating_video(frames=8, grid=(12, 16), stride=8, dim=64):
    """Features identify the content position (a random code per scene cell); the scene moves one cell
    right per frame, wrapping around, and the masks move with it, so every cell stays matchable."""
    generator = torch.Generator().manual_seed(0)
    h, w = grid
    code = F.normalize(torch.randn(dim, h, w, generator=generator), dim=0)
    first = np.zeros((h * stride, w * stride), np.uint8)
    first[3 * stride:8 * stride, 2 * stride:6 * stride] = 1
    first[8 * stride:11 * stride, 9 * stride:11 * stride] = 2
    feats = [torch.roll(code, t, dims=2) for t in range(frames)]
    masks = [np.roll(first, t * stride, axis=1) for t in range(frames)]
    return feats, masks


@pytest.mark.parametrize("preset", ["dino", "crw", "smtc"])
def test_translating_video_is_tracked(preset):
    feats, masks = translating_video()
    out = list(propagate_video(feats, masks[0], masks[0].shape, PRESETS[preset], stride=8))
    for obj in (1, 2):
        j = [region_similarity(gt == obj, pred == obj) for gt, pred in zip(masks[1:], out)]
        assert min(j) > 0.85, (obj, j)
        assert np.mean(j) > 0.9


def test_network_size_follows_each_protocol():
    assert network_size(480, 854, PRESETS["dino"], 16) == (480, 832)
    assert network_size(854, 480, PRESETS["dino"], 16) == (832, 480)
    assert network_size(480, 854, PRESETS["crw"], 16) == (480, 848)
    assert network_size(480, 854, PRESETS["crw"], 8) == (480, 848)
    # patch 14 (DINOv2): both sides multiples of 14; 64 is not one, so the long side is floored to 14s
    assert network_size(480, 854, PRESETS["dino"], 14) == (476, 854)
    assert network_size(854, 480, PRESETS["dino"], 14) == (854, 476)
    assert network_size(480, 854, PRESETS["smtc"], 14) == (476, 854)
    assert PRESETS["smtc_upsampled"].upsample == 2 and PRESETS["smtc_upsampled"].topk == 28


def test_first_frame_labels_one_hot_and_void():
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 2
    mask[3, 3] = 255
    labels = first_frame_labels(mask, (2, 2), "nearest")
    assert labels.shape == (3, 2, 2)
    assert labels[2, 0, 0] == 1 and labels[0, 1, 1] == 1   # void counts as background


def colour_features(x: torch.Tensor) -> torch.Tensor:
    """A stand-in backbone: 8x8 average (normalised) colour plus a coarse position code, L2-normalised."""
    pooled = F.avg_pool2d(x, 8)
    b, _, h, w = pooled.shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    position = torch.stack([yy, xx]).expand(b, -1, -1, -1) * 0.3
    return F.normalize(torch.cat([pooled, position], 1), dim=1)


def test_propagate_sequences_writes_davis_layout_and_scores(davis_dir, tmp_path):
    sequences = list(DavisFolder(davis_dir))
    cfg = replace(PRESETS["crw"], context=4)
    timing = propagate_sequences(sequences, colour_features, 8, cfg, tmp_path, torch.device("cpu"), batch=5)
    assert timing["frames"] == sum(len(s.frames) for s in sequences)
    for sequence in sequences:
        written = sorted(p.stem for p in (tmp_path / sequence.name).glob("*.png"))
        assert written == list(sequence.frame_stems)
    table = global_table(evaluate_folder(davis_dir, tmp_path))
    assert 0.0 <= table["J&F-Mean"] <= 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["dino", "crw"])
def test_cuda_kernel_equals_cpu(preset):
    feats, labels = random_video(frames=5, grid=(30, 52), dim=64)
    cfg = PRESETS[preset]
    cpu = Propagator(feats[0], labels, cfg)
    gpu = Propagator(feats[0].cuda(), labels.cuda(), cfg)
    for feature in feats[1:]:
        torch.testing.assert_close(gpu.step(feature.cuda()).cpu(), cpu.step(feature), rtol=1e-4, atol=1e-5)


def test_bench_gpu_memory_is_read_on_the_bench_device(monkeypatch):
    # the bench read torch's current device: "--device cuda:1" reported GPU 0's peak memory
    from eval import bench_label_prop

    calls = []
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: calls.append((name, device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append(("max", device)) or 0)
    device = torch.device("cuda:1")
    bench_label_prop._reset_peak(device)
    bench_label_prop._peak_mib(device)
    assert calls and all(d == device for _, d in calls)
