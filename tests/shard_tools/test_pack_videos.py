import io
import json
import struct

import av
import numpy as np
import pytest

from shard_tools import pack
from shard_tools.manifest import load_manifest
from shard_tools.reader import decode_frames, iter_samples, sample_meta


def decode_file(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def run_pack(*args) -> int:
    return pack.main([*map(str, args), "--quiet"])


@pytest.mark.parametrize("fixture, min_psnr", [("jpeg_shards", 35), ("h264_shards", 30), ("vp9_shards", 33)])
def test_round_trip_frames_size_fps_labels_and_pixels(request, synth_raw, psnr, fixture, min_psnr):
    dataset = request.getfixturevalue(fixture)
    manifest = load_manifest(dataset)
    assert manifest["samples"] == 6 and manifest["frames"] == 6 * 32 and len(manifest["shards"]) >= 2
    assert manifest["classes"] == {"checker": 0, "dots": 1, "stripes": 2} and manifest["skipped"] == []
    seen = set()
    for _, key, members in iter_samples(dataset):
        meta, nframes = sample_meta(members)
        assert "." not in key and key == meta["key"] and key.endswith("_00000")
        assert (nframes, meta["fps"], meta["width"], meta["height"]) == (32, 25.0, 128, 96)
        label = manifest["classes"][meta["label_name"]]
        assert meta["label"] == label == int(members["cls"]) == struct.unpack("<i", members["label.i32"])[0]
        assert meta["source"].startswith(meta["label_name"] + "/") and not meta["eval"]
        frames = decode_frames(members)
        source = decode_file(synth_raw / "videos" / meta["source"])
        assert frames.shape == source.shape == (32, 96, 128, 3)
        assert psnr(frames, source) > min_psnr
        seen.add(meta["source"])
    assert len(seen) == 6


@pytest.mark.parametrize("fixture, codec, ext", [("h264_shards", "h264", "mp4"), ("vp9_shards", "vp9", "webm")])
def test_encoded_clips_have_closed_gops_no_bframes_yuv420p(request, fixture, codec, ext):
    for _, key, members in iter_samples(request.getfixturevalue(fixture)):
        assert set(members) == {ext, "json", "nframes.i32", "cls", "label.i32"}
        with av.open(io.BytesIO(members[ext])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == codec and stream.codec_context.pix_fmt == "yuv420p"
            if codec == "h264":
                assert stream.codec_context.profile == "High"
            frames = list(container.decode(stream))
        assert [i for i, f in enumerate(frames) if f.key_frame] == [0, 16]
        assert {int(f.pict_type) for f in frames} <= {1, 2}          # I and P frames only
        assert np.allclose(np.diff([f.time for f in frames]), 1 / 25)


def test_constant_fps_resampling_and_short_side(tmp_path, grey_video):
    grey_video(tmp_path / "src" / "v.mp4", frames=20, fps=10)          # grey 0, 10, … 190
    for fps, expected in [(5, [20 * i for i in range(10)]), (25, [10 * (i * 10 // 25) for i in range(50)])]:
        out = tmp_path / f"out{fps}"
        assert run_pack("--kind", "videos", "--src", tmp_path / "src", "--out", out, "--fps", fps,
                        "--short-side", 32, "--quality", 95) == 0
        [(_, _, members)] = list(iter_samples(out))
        meta, nframes = sample_meta(members)
        frames = decode_frames(members)
        assert nframes == len(expected) and frames.shape == (len(expected), 32, 42, 3)
        assert (meta["label"], meta["label_name"]) == (None, None) and "cls" not in members
        np.testing.assert_allclose(frames.reshape(len(expected), -1).mean(1), expected, atol=2.5)


def test_clip_seconds_cuts_fixed_segments_and_counts_the_dropped_tail(tmp_path, grey_video):
    grey_video(tmp_path / "src" / "v.mp4", frames=20, fps=10)
    out = tmp_path / "out"
    assert run_pack("--kind", "videos", "--src", tmp_path / "src", "--out", out, "--fps", 10,
                    "--short-side", 0, "--clip-seconds", 0.7) == 0
    samples = sorted((sample_meta(m)[0]["segment"], m) for _, _, m in iter_samples(out))
    assert [sample_meta(m)[1] for _, m in samples] == [7, 7]
    assert [sample_meta(m)[0]["start_time"] for _, m in samples] == [0.0, 0.7]
    assert abs(decode_frames(samples[1][1])[0].mean() - 70) < 2.5
    manifest = load_manifest(out)
    assert manifest["tail_frames_dropped"] == 6 and manifest["frames"] == 14


def test_labels_csv_assigns_labels_and_reports_unlisted_and_missing(tmp_path, grey_video):
    for name in ("a", "b", "c"):
        grey_video(tmp_path / "src" / f"{name}.mp4", frames=4)
    (tmp_path / "labels.csv").write_text("path,label\na.mp4,jump\nb.mp4,run\ngone.mp4,run\n")
    out = tmp_path / "out"
    assert run_pack("--kind", "videos", "--src", tmp_path / "src", "--out", out, "--labels",
                    tmp_path / "labels.csv", "--short-side", 0) == 0
    manifest = load_manifest(out)
    assert manifest["classes"] == {"jump": 0, "run": 1}
    labels = {sample_meta(m)[0]["source"]: int(m["cls"]) for _, _, m in iter_samples(out)}
    assert labels == {"a.mp4": 0, "b.mp4": 1}
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"c.mp4", "gone.mp4"}
    assert "not listed" in reasons["c.mp4"] and "not found" in reasons["gone.mp4"]


def test_samples_are_shuffled_across_shards_by_seed(tmp_path, grey_video):
    for i in range(8):
        grey_video(tmp_path / "src" / f"v{i}.mp4", frames=2, width=16, height=16)
    orders = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        assert run_pack("--kind", "videos", "--src", tmp_path / "src", "--out", out, "--seed", seed,
                        "--name", "ds", "--short-side", 0, "--shard-size", 9000) == 0
        orders[seed] = [key for _, key, _ in iter_samples(out)]
        assert len(load_manifest(out)["shards"]) >= 2
    assert sorted(orders[0]) == sorted(orders[1]) and len(set(orders[0])) == 8
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])
    assert json.loads((tmp_path / "s0" / "manifest.json").read_text())["settings"]["seed"] == 0


def test_numeric_labels_keep_their_values(tmp_path, grey_video):
    for name in ("a", "b", "c"):
        grey_video(tmp_path / "src" / f"{name}.mp4", frames=2, width=16, height=16)
    (tmp_path / "labels.csv").write_text("a.mp4,2\nb.mp4,10\nc.mp4,0\n")
    out = tmp_path / "out"
    assert run_pack("--kind", "videos", "--src", tmp_path / "src", "--out", out, "--labels",
                    tmp_path / "labels.csv", "--short-side", 0) == 0
    assert load_manifest(out)["classes"] == {"0": 0, "2": 1, "10": 2}
    assert {sample_meta(m)[0]["source"]: int(m["cls"]) for _, _, m in iter_samples(out)} == \
        {"a.mp4": 1, "b.mp4": 2, "c.mp4": 0}
