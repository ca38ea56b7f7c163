import itertools

import numpy as np
import pytest
import torch

from pipeline import DataConfig, MulticropViews, build_loader
from pipeline.fallback import decode_video, stack_frames
from pipeline.reader import ShardDataset


@pytest.mark.parametrize("fixture", ["h264_shards", "vp9_shards"])
def test_video_decode_seeks_to_the_requested_frames(request, fixture):
    ds = ShardDataset(request.getfixturevalue(fixture))
    data = ds.array(0, ds.video_ext(0))
    everything = decode_video(data, np.arange(ds.nframes(0)))
    assert everything.shape == (32, 96, 128, 3)
    wanted = np.array([17, 21, 25, 29])               # past the first GOP: decoded after a seek
    assert np.array_equal(decode_video(data, wanted), everything[wanted])


def test_video_samples_give_the_views_of_their_jpeg_twins(jpeg_shards, h264_shards):
    """Same sample order and parameters on every format: only the codec's rounding differs."""
    spec = MulticropViews(frames=3, stride=5, global_size=32, local_size=16, local_crops=2)
    batches = {}
    for path in (jpeg_shards, h264_shards):
        loader = build_loader(DataConfig(path=str(path), batch_size=3, num_workers=0, device="cpu"), spec, 0, 1)
        batches[path] = list(itertools.islice(iter(loader), 2))
    keys = [[ShardDataset(p).keys[i].split("_", 1)[1] for i in range(6)]   # key: <dataset>_<video>_<seg>
            for p in (jpeg_shards, h264_shards)]
    assert keys[0] == keys[1]
    for a, b in zip(batches[jpeg_shards], batches[h264_shards]):
        assert torch.equal(a["sample"], b["sample"])
        for k in ("global", "local"):
            assert (a[k] - b[k]).abs().mean() < 0.1       # normalised units; images differ by ~5 levels


def test_stack_frames_pads_smaller_frames():
    out = stack_frames([np.full((4, 6, 3), 7, np.uint8), np.full((5, 3, 3), 9, np.uint8)])
    assert out.shape == (2, 5, 6, 3) and out[0, 4].sum() == 0 and out[1, :, 3:].sum() == 0
    assert (out[0, :4] == 7).all() and (out[1, :, :3] == 9).all()
