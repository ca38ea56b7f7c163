import dataclasses
import itertools
import logging

import pytest
import torch

from pipeline import ClipViews, DataConfig, GridViews, MulticropViews, build_loader

from .pipeline_data import RAMP_LABELS, RAMP_NFRAMES, to_unit

SPECS = {
    "grid": GridViews(frames=4, stride=2, size=64, scale=(0.8, 0.95), ratio=(0.7, 1.3),
                      patch_size=16, patch_stride=8),
    "multicrop_t1": MulticropViews(frames=1, global_size=32, local_size=16, local_crops=4),
    "multicrop_t4": MulticropViews(frames=4, stride=3, global_size=32, local_size=16, local_crops=2,
                                   per_frame_color=True),
    "clip": ClipViews(frames=4, stride=2, size=32),
}
SHAPES = {
    "grid": {"patches": (3, 4, 49, 3, 16, 16)},
    "multicrop_t1": {"global": (3, 2, 1, 3, 32, 32), "local": (3, 4, 1, 3, 16, 16)},
    "multicrop_t4": {"global": (3, 2, 4, 3, 32, 32), "local": (3, 2, 4, 3, 16, 16)},
    "clip": {"clip": (3, 4, 3, 32, 32)},
}


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _cfg(path, **kw):
    return DataConfig(path=str(path), **{"batch_size": 3, "num_workers": 0, "device": "cpu", **kw})


@pytest.mark.parametrize("name", list(SPECS))
def test_shapes_dtypes_and_labels_per_family(jpeg_shards, name):
    batch, = _take(build_loader(_cfg(jpeg_shards), SPECS[name], 0, 1), 1)
    shapes = {k: tuple(v.shape) for k, v in batch.items() if k not in ("label", "sample")}
    assert shapes == SHAPES[name]
    assert all(batch[k].dtype == torch.float32 for k in shapes)
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1, 2}
    for k in shapes:      # normalised views: roughly zero-mean, not constant
        assert batch[k].std() > 0.2 and batch[k].mean().abs() < 1.5


def _frames_of_views(views):
    """(..., T, 3, h, w) normalised views -> frame indices from R = 10 * frame, and G/B."""
    unit = to_unit(views) * 255
    return (unit[..., 0, :, :].mean((-1, -2)) / 10).round().long(), unit[..., 1:, :, :]


@pytest.mark.parametrize("name", ["clip", "multicrop_t4"])
def test_all_frames_of_a_view_share_one_crop_and_fit_the_sample(ramp_shards, name):
    spec = dataclasses.replace(SPECS[name], color=False)
    loader = build_loader(_cfg(ramp_shards, batch_size=4), spec, 0, 1)
    for batch in _take(loader, 4):
        nframes = torch.tensor(RAMP_NFRAMES)[batch["sample"]]
        assert batch["label"].tolist() == [RAMP_LABELS[s] for s in batch["sample"].tolist()]
        views = [batch["clip"].unsqueeze(1)] if name == "clip" else [batch["global"], batch["local"]]
        for v in views:                                     # (B, V, T, 3, h, w)
            index, gb = _frames_of_views(v)
            start = index[..., 0]
            steps = torch.arange(spec.frames) * spec.stride
            assert torch.equal(index, start.unsqueeze(-1) + steps)      # T frames at stride S
            assert (start >= 0).all() and (start + steps[-1] + 1 <= nframes.unsqueeze(1)).all()
            # G and B encode x and y: the same box in every frame (JPEG noise only)
            assert (gb - gb[:, :, :1]).abs().max() <= 4
            # and different views got different boxes
            assert (gb[:, 0] - gb[:, -1]).abs().mean() > 4 or v.shape[1] == 1


def test_short_samples_are_left_out_and_reported(ramp_shards, caplog):
    spec = ClipViews(frames=4, stride=4, size=16)          # span 13
    with caplog.at_level(logging.WARNING):
        loader = build_loader(_cfg(ramp_shards, batch_size=1), spec, 0, 1)
    usable = {i for i, n in enumerate(RAMP_NFRAMES) if n >= 13}
    assert "3 of 7 samples have fewer than 13 frames" in caplog.text and "ramp_v0_00000" in caplog.text
    seen = {b["sample"].item() for b in _take(loader, 2 * len(usable))}
    assert seen == usable
    with pytest.raises(ValueError, match="no sample has the 31 frames"):
        build_loader(_cfg(ramp_shards), ClipViews(frames=4, stride=10), 0, 1)


def test_same_seed_same_batches_any_worker_count(ramp_shards):
    spec = SPECS["multicrop_t4"]
    a = _take(build_loader(_cfg(ramp_shards, seed=3), spec, 0, 1), 4)
    b = _take(build_loader(_cfg(ramp_shards, seed=3, num_workers=2), spec, 0, 1), 4)
    c = _take(build_loader(_cfg(ramp_shards, seed=4), spec, 0, 1), 4)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(x["global"], z["global"]) for x, z in zip(a, c))


def test_resume_equals_uninterrupted(ramp_shards):
    spec = SPECS["grid"]
    full = _take(build_loader(_cfg(ramp_shards), spec, 0, 1), 6)           # crosses two epochs of 7
    first = build_loader(_cfg(ramp_shards), spec, 0, 1)
    _take(first, 2)
    state = first.state_dict()
    assert state["position"] == 6 and state["epoch"] == 0
    resumed = build_loader(_cfg(ramp_shards), spec, 0, 1)
    resumed.load_state_dict(state)
    for x, y in zip(full[2:], _take(resumed, 4)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert resumed.epoch == 2


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_samples_covering_each_epoch(ramp_shards, world_size):
    spec = ClipViews(frames=1, size=8, color=False)
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(_cfg(ramp_shards, batch_size=1), spec, rank, world_size)
        per_rank.append([b["sample"].item() for b in _take(loader, loader.epoch_length)])
    joined = sum(per_rank, [])
    assert sorted(joined) == list(range(len(RAMP_NFRAMES)))


def test_unordered_reading_without_shuffle(ramp_shards):
    spec = ClipViews(frames=1, size=8)
    loader = build_loader(_cfg(ramp_shards, batch_size=7, shuffle_buffer=0), spec, 0, 1)
    assert _take(loader, 1)[0]["sample"].tolist() == list(range(7))


def test_dali_graph_runs_on_the_gpu_the_device_names(monkeypatch):
    # device_id was torch's current device: "cuda:1" with current device 0 decoded on GPU 0
    from pipeline.dali import dali_device_id

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert dali_device_id("cuda:1") == 1
    assert dali_device_id("cuda") == 0


def test_neco_views_carry_their_boxes_and_flips(jpeg_shards):
    """The CPU path's batch has each view's box (frame pixels) and flip; with flips off and a box of a
    whole frame, that view is the resized frame, so the boxes are the ones the renderer used."""
    spec = MulticropViews(frames=1, global_crops=2, global_size=32, global_scale=(1.0, 1.0),
                          ratio=(0.1, 10.0), local_crops=2, local_size=16, min_overlap=0.01, boxes=True, flip=False,
                          color=False)
    batch, = _take(build_loader(_cfg(jpeg_shards), spec, 0, 1), 1)
    assert batch["boxes"].shape == (3, 4, 4) and batch["boxes"].dtype == torch.float32
    assert batch["flip"].shape == (3, 4) and not batch["flip"].any()
    x0, y0, x1, y1 = batch["boxes"][:, :2].unbind(-1)
    assert (x0 == 0).all() and (y0 == 0).all()          # scale 1 with any aspect: the whole frame
    torch.testing.assert_close(batch["global"][:, 0], batch["global"][:, 1])
