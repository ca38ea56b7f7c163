import itertools
import logging

import pytest

from pipeline import ClipViews, DataConfig, build_loader
from pipeline.reader import SampleError
from .pipeline_data import ramp_members, write_dataset

SPEC = ClipViews(frames=2, stride=1, size=16)


def _one_epoch(path, caplog, **kw):
    cfg = DataConfig(path=str(path), batch_size=1, num_workers=0, device="cpu", **kw)
    loader = build_loader(cfg, SPEC, 0, 1)
    with caplog.at_level(logging.WARNING):
        samples = [b["sample"].item() for b in itertools.islice(iter(loader), loader.epoch_length)]
    return loader, samples


def test_corrupt_samples_are_skipped_counted_and_logged(corrupt_shards, caplog):
    loader, samples = _one_epoch(corrupt_shards, caplog)
    assert len(samples) == 7 and not {1, 4} & set(samples)          # replaced, never yielded
    assert set(samples) == {0, 2, 3, 5, 6}
    keys = {where.split(":")[1]: count for where, count in loader.skipped.items()}
    assert set(keys) == {"bad_header_00000", "bad_tables_00000"} and all(c >= 1 for c in keys.values())
    assert all(where.split(":")[0].startswith("test-") and where.split(":")[0].endswith(".tar")
               for where in loader.skipped)
    assert "bad_header_00000" in caplog.text and "bad_tables_00000" in caplog.text
    assert loader.state_dict()["skipped"] == dict(loader.skipped)


def test_missing_component_is_an_error_naming_shard_and_key(tmp_path):
    no_count = ramp_members(6, 0)
    del no_count["nframes.i32"]
    path = write_dataset(tmp_path / "a", [("ok_v0_00000", ramp_members(6, 0), 6), ("nocount_00000", no_count, 6)])
    with pytest.raises(SampleError, match=r"test-00000\d\.tar:nocount_00000 has no 'nframes.i32' member"):
        build_loader(DataConfig(path=str(path), device="cpu"), SPEC, 0, 1)

    gap = ramp_members(6, 0)
    del gap["f003.jpg"]
    path = write_dataset(tmp_path / "b", [("gap_00000", gap, 6)])
    loader = build_loader(DataConfig(path=str(path), batch_size=1, num_workers=0, device="cpu"),
                          ClipViews(frames=6, size=8), 0, 1)
    with pytest.raises(SampleError, match=r"test-000000\.tar:gap_00000 has no 'f003.jpg' member"):
        next(iter(loader))
