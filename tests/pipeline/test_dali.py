"""The DALI graph on the CPU (`device_id=None`) against the PIL / PyAV path on the same parameters."""
import itertools

import pytest
import torch

from pipeline import ClipViews, DataConfig, MulticropViews, build_loader
from pipeline.reader import SampleError
from .pipeline_data import ramp_members, write_dataset

pytestmark = pytest.mark.dali

SPEC = MulticropViews(frames=2, stride=4, global_size=32, local_size=16, local_crops=2,
                      per_frame_color=True)


def _batches(path, backend, n=2, spec=SPEC, batch_size=3, seed=0):
    cfg = DataConfig(path=str(path), batch_size=batch_size, backend=backend, num_workers=1, num_threads=2,
                     device="cpu", seed=seed)
    loader = build_loader(cfg, spec, 0, 1)
    return loader, list(itertools.islice(iter(loader), n))


def test_dali_cpu_jpeg_equals_the_fallback(jpeg_shards):
    _, dali = _batches(jpeg_shards, "dali")
    _, cpu = _batches(jpeg_shards, "cpu")
    for a, b in zip(dali, cpu):
        assert torch.equal(a["sample"], b["sample"]) and torch.equal(a["label"], b["label"])
        for k in ("global", "local"):
            # both decoders are libjpeg-turbo: identical pixels up to an occasional rounding step
            assert (a[k] - b[k]).abs().max() < 0.05 and (a[k] - b[k]).abs().mean() < 1e-3


def test_dali_cpu_renders_smtc_clips_like_the_fallback(jpeg_shards):
    spec = ClipViews(frames=3, stride=2, size=32, scale=(1.0, 1.0), ratio=(0.25, 4.0), flip=False,
                     jitter=(0.4, 0.4, 0.4, 0.1), color_draws=2)
    _, dali = _batches(jpeg_shards, "dali", spec=spec)
    _, cpu = _batches(jpeg_shards, "cpu", spec=spec)
    for a, b in zip(dali, cpu):
        assert a["clip"].shape == b["clip"].shape == (3, 2, 3, 3, 32, 32)
        assert (a["clip"] - b["clip"]).abs().max() < 0.05 and (a["clip"] - b["clip"]).abs().mean() < 1e-3


def test_dali_cpu_vp9_matches_pyav(vp9_shards):
    _, dali = _batches(vp9_shards, "dali")
    _, cpu = _batches(vp9_shards, "cpu")
    for a, b in zip(dali, cpu):
        assert torch.equal(a["sample"], b["sample"])
        for k in ("global", "local"):
            assert (a[k] - b[k]).abs().mean() < 0.05     # YUV->RGB conversions differ slightly


def test_dali_skips_bad_headers_and_names_undecodable_samples(corrupt_shards):
    spec = ClipViews(frames=2, size=16)
    loader, batches = _batches(corrupt_shards, "dali", n=1, spec=spec, batch_size=3, seed=4)
    # with seed 4 the epoch starts with samples 1, 2, 0: bad_header_00000 (id 1) is caught before
    # decoding and replaced by the next sample of the order; bad_tables_00000 (id 4) comes later
    assert loader.source.order.epoch(0)[:3].tolist() == [1, 2, 0]
    assert batches[0]["sample"].tolist() == [2, 2, 0]
    assert any(where.endswith(":bad_header_00000") for where in loader.skipped)
    # a structurally valid JPEG with corrupt tables stops nvJPEG: the error names the candidates
    with pytest.raises(RuntimeError, match="bad_tables_00000"):
        _batches(corrupt_shards, "dali", n=3, spec=spec, batch_size=7)


def test_dali_missing_component_names_shard_and_key(tmp_path):
    gap = ramp_members(6, 0)
    del gap["f002.jpg"]
    path = write_dataset(tmp_path / "gap", [("ok_v0_00000", ramp_members(6, 0), 6), ("gap_00000", gap, 6)])
    with pytest.raises(SampleError, match=r"gap_00000 has no 'f002.jpg' member"):
        _batches(path, "dali", n=1, spec=ClipViews(frames=6, size=8), batch_size=2)


def test_dali_cpu_gives_neco_boxes_like_the_fallback(jpeg_shards):
    """NeCo's views: the same boxes, flips and colours (the reference's blur p 0.5, no solarize) from both
    backends (they travel in the packed rows)."""
    spec = MulticropViews(frames=1, global_size=32, local_size=16, local_crops=2, min_overlap=0.01,
                          boxes=True, flip=True, global_blur=(0.5, 0.5), global_solarize=(0.0, 0.0))
    _, dali = _batches(jpeg_shards, "dali", spec=spec)
    _, cpu = _batches(jpeg_shards, "cpu", spec=spec)
    for a, b in zip(dali, cpu):
        assert a["boxes"].shape == (3, 4, 4) and torch.equal(a["boxes"].cpu(), b["boxes"])
        assert torch.equal(a["flip"].cpu(), b["flip"])
        assert (a["global"] - b["global"]).abs().max() < 0.05 and (a["local"] - b["local"]).abs().max() < 0.05
