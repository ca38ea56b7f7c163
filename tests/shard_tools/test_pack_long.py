import io

import av
import numpy as np
import pytest

from shard_tools import pack
from shard_tools.encode import EncodeSettings
from shard_tools.inspect import verify_dataset
from shard_tools.manifest import load_manifest
from shard_tools.reader import decode_frames, iter_samples, sample_meta
from shard_tools.sources import video_segments

def run_pack(*args) -> int:
    return pack.main([*map(str, args), "--quiet"])


@pytest.mark.parametrize("fmt", ["jpeg", "h264"])
def test_long_video_is_cut_into_keyframe_aligned_segments(tmp_path, grey_video, fmt):
    grey_video(tmp_path / "src" / "walk.mp4", frames=100, fps=10)          # 10 s, grey 10*i % 256
    out = tmp_path / "out"
    assert run_pack("--kind", "long", "--src", tmp_path / "src", "--out", out, "--format", fmt, "--fps", 5,
                    "--clip-seconds", 3, "--short-side", 0, "--quality", 95, "--crf", 10) == 0
    manifest = load_manifest(out)
    assert manifest["samples"] == 3 and manifest["tail_frames_dropped"] == 5     # 50 frames = 3 x 15 + 5
    segments = {}
    for _, key, members in iter_samples(out):
        meta, nframes = sample_meta(members)
        assert nframes == 15 and key.endswith(f"_{meta['segment']:05d}")
        assert meta["start_time"] == 3.0 * meta["segment"] and meta["label"] is None
        segments[meta["segment"]] = members
        first = decode_frames(members)[0].mean()
        assert abs(first - (10 * 2 * 15 * meta["segment"]) % 256) < 3          # source frame at 3 s * k
        if fmt == "h264":
            with av.open(io.BytesIO(members["mp4"])) as container:
                frames = list(container.decode(video=0))
            assert frames[0].key_frame and int(frames[0].pict_type) == 1
    assert sorted(segments) == [0, 1, 2] and verify_dataset(out) == []


def test_long_video_requires_clip_seconds(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert run_pack("--kind", "long", "--src", tmp_path / "src", "--out", tmp_path / "out") == 2
    assert "--kind long needs --clip-seconds" in capsys.readouterr().err


def test_segments_stream_while_the_source_is_decoded(tmp_path, grey_video):
    """The first segment comes out long before the end of the source is decoded (bounded memory)."""
    path = grey_video(tmp_path / "v.mp4", frames=100, fps=10)
    stats: dict = {}
    segments = video_segments(str(path), EncodeSettings(fps=10, short_side=0), 10, stats)
    first = next(segments)
    assert first.index == 0 and first.nframes == 10
    assert stats["decoded_seconds"] < 3.0                      # of 10 s
    assert len(list(segments)) == 9


def test_decode_error_keeps_complete_segments_before_it(tmp_path, noise_video):
    noise_video(tmp_path / "src" / "walk.mp4", frames=60)
    path = tmp_path / "src" / "walk.mp4"
    data = bytearray(path.read_bytes())
    at = int(len(data) * 0.8)
    data[at:at + 4000] = np.random.default_rng(2).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert run_pack("--kind", "long", "--src", tmp_path / "src", "--out", out, "--fps", 10,
                    "--clip-seconds", 1, "--short-side", 0) == 0
    manifest = load_manifest(out)
    kept = manifest["samples"]
    assert 2 <= kept < 6 and verify_dataset(out) == []
    [skipped] = manifest["skipped"]
    assert skipped["path"] == "walk.mp4" and f"kept the {kept} complete segments" in skipped["reason"]
    assert sorted(sample_meta(m)[0]["segment"] for _, _, m in iter_samples(out)) == list(range(kept))


def test_long_kind_on_the_synthetic_videos(synth_raw, tmp_path):
    out = tmp_path / "out"
    assert run_pack("--kind", "long", "--src", synth_raw / "videos", "--out", out, "--format", "vp9",
                    "--clip-seconds", 0.4, "--fps", 25, "--short-side", 64) == 0
    manifest = load_manifest(out)
    # 32 frames per video = 3 segments of 10 + a dropped tail of 2
    assert (manifest["samples"], manifest["frames"], manifest["tail_frames_dropped"]) == (18, 180, 12)
    assert verify_dataset(out) == []
    for _, _, members in iter_samples(out):
        meta, _ = sample_meta(members)
        assert (meta["width"], meta["height"], meta["source_info"]["width"]) == (86, 64, 128)
