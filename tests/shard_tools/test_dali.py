"""The packed shards and indexes as DALI reads them (CPU-only DALI: device_id=None)."""
import numpy as np
import pytest

from shard_tools.manifest import load_manifest
from shard_tools.reader import decode_frames, iter_samples, sample_meta

pytestmark = pytest.mark.dali


def _read_all(dataset, ext, dtypes, extra=None):
    """Run a CPU DALI pipeline over the dataset once; returns per-sample outputs and source infos."""
    from nvidia.dali import fn, pipeline_def, types

    manifest = load_manifest(dataset)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        outs = fn.readers.webdataset(paths=[str(p) for p in manifest["tar_paths"]],
                                     index_paths=[str(p) for p in manifest["idx_paths"]], ext=ext,
                                     dtypes=dtypes, missing_component_behavior="error", name="reader")
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        return tuple(outs + ([extra(outs)] if extra else []))

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    results = []
    for _ in range(n):
        batch = p.run()
        results.append(([np.array(o.as_cpu()[0]) for o in batch], batch[0][0].source_info()))
    return manifest, results


def test_dali_reads_every_sample_through_our_index(jpeg_shards):
    from nvidia.dali import types

    manifest, results = _read_all(jpeg_shards, ["nframes.i32", "label.i32", "f031.jpg"],
                                  [types.INT32, types.INT32, types.UINT8])
    assert len(results) == manifest["samples"] == 6
    expected = {key: members for _, key, members in iter_samples(jpeg_shards)}
    for (nframes, label, jpeg), info in results:
        key = info.rsplit(":", 1)[1].split(".", 1)[0]
        meta, _ = sample_meta(expected[key])
        assert int(nframes[0]) == 32 and int(label[0]) == meta["label"]
        assert jpeg.tobytes() == expected[key]["f031.jpg"]


def test_dali_decodes_vp9_clips_on_cpu_with_nframes_frames(vp9_shards, psnr):
    from nvidia.dali import fn, types

    manifest, results = _read_all(vp9_shards, ["webm", "nframes.i32"], [types.UINT8, types.INT32],
                                  extra=lambda outs: fn.decoders.video(outs[0], device="cpu"))
    assert len(results) == manifest["samples"]
    expected = {key: members for _, key, members in iter_samples(vp9_shards)}
    for (_, nframes, frames), info in results:
        assert frames.shape == (int(nframes[0]), 96, 128, 3) == (32, 96, 128, 3)
        pyav = decode_frames(expected[info.rsplit(":", 1)[1].split(".", 1)[0]])
        # same frames as PyAV decodes (DALI converts YUV to RGB slightly differently: compare luma)
        assert psnr(frames, pyav) > 40 > psnr(frames[1:], pyav[:-1])
