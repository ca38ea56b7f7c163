"""Every bad-input class is either packed correctly or reported with its path and reason."""
import av
import numpy as np
import pytest

from shard_tools import pack
from shard_tools.encode import BadInput, EncodeSettings
from shard_tools.sources import video_segments
from shard_tools.inspect import verify_dataset
from shard_tools.manifest import load_manifest
from shard_tools.reader import decode_frames, iter_samples, sample_meta

def run_pack(*args) -> int:
    return pack.main([*map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def bad_src(tmp_path_factory, grey_video, noise_video, rotate_mp4):
    src = tmp_path_factory.mktemp("bad") / "src"
    good = grey_video(src / "good.mp4", frames=20)
    data = good.read_bytes()
    (src / "zero.mp4").write_bytes(b"")
    (src / "text.mp4").write_text("this is not a video\n" * 20)
    (src / "notes.txt").write_text("a readme next to the videos")
    (src / "truncated_moov_last.mp4").write_bytes(data[: len(data) // 2])
    noise_video(src / "full.mp4")
    full = (src / "full.mp4").read_bytes()
    (src / "truncated_moov_first.mp4").write_bytes(full[: len(full) // 2])
    corrupt = bytearray(full)                        # garbage in the middle of the frame data
    middle = len(corrupt) // 2
    corrupt[middle: middle + 4000] = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (src / "corrupt.mp4").write_bytes(bytes(corrupt))
    with av.open(str(src / "audio_only.mp4"), "w") as container:   # no video stream to decode
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    grey_video(src / "odd.webm", frames=10, width=63, height=47, codec="libvpx-vp9")
    grey_video(src / "vfr.mp4", frames=10, pts=[0, 10, 20, 25, 30, 60, 70, 80, 90, 95])
    rotated = grey_video(src / "rotated.mp4", frames=5, width=64, height=32)
    rotate_mp4(rotated, -90)                   # a phone's portrait video: shown turned clockwise
    return src


@pytest.fixture(scope="module")
def packed(bad_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "out"
    assert run_pack("--kind", "videos", "--src", bad_src, "--out", out, "--fps", 10, "--short-side", 0) == 0
    return out


def test_every_bad_file_is_reported_with_its_reason(packed):
    reasons = {s["path"]: s["reason"] for s in load_manifest(packed)["skipped"]}
    assert set(reasons) == {"zero.mp4", "text.mp4", "notes.txt", "truncated_moov_last.mp4",
                            "truncated_moov_first.mp4", "corrupt.mp4", "audio_only.mp4"}
    assert "cannot open as a video" in reasons["zero.mp4"] and "cannot open" in reasons["text.mp4"]
    assert "not a video file extension (.txt)" in reasons["notes.txt"]
    assert "cannot open" in reasons["truncated_moov_last.mp4"]
    # a threaded decoder reports the cut as a decode error, a single thread as a short stream
    assert reasons["truncated_moov_first.mp4"].startswith(("truncated: decoded", "decode error"))
    assert "decode error" in reasons["corrupt.mp4"]
    assert reasons["audio_only.mp4"] == "no video stream"


def test_good_odd_vfr_and_rotated_files_are_packed_correctly(packed):
    assert verify_dataset(packed) == []                  # no partial sample, nframes all correct
    samples = {sample_meta(m)[0]["source"]: m for _, _, m in iter_samples(packed)}
    assert set(samples) == {"good.mp4", "full.mp4", "odd.webm", "vfr.mp4", "rotated.mp4"}
    odd = decode_frames(samples["odd.webm"])
    assert odd.shape == (10, 48, 64, 3)                  # 63x47 -> nearest even size
    vfr = decode_frames(samples["vfr.mp4"])              # frame at t=0.3 is the one stamped 0.3 s
    np.testing.assert_allclose(vfr.reshape(len(vfr), -1).mean(1), [0, 10, 20, 40, 40, 40, 50, 60, 70, 80, 90], atol=2.5)
    rotated = decode_frames(samples["rotated.mp4"])
    meta, _ = sample_meta(samples["rotated.mp4"])
    assert rotated.shape[1:3] == (64, 32) and (meta["width"], meta["height"]) == (32, 64)


def test_rotation_turns_the_picture_the_way_players_show_it(tmp_path, rotate_mp4):
    """A white left edge, displayed turned 90 degrees clockwise, ends up as the top rows."""
    src = tmp_path / "src"
    path = src / "r.mp4"
    path.parent.mkdir()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        image = np.zeros((32, 64, 3), np.uint8)
        image[:, :16] = 255
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    rotate_mp4(path, -90)
    out = tmp_path / "out"
    assert run_pack("--kind", "videos", "--src", src, "--out", out, "--fps", 10, "--short-side", 0,
                    "--quality", 95) == 0
    [(_, _, members)] = list(iter_samples(out))
    frame = decode_frames(members)[0].mean(2)
    assert frame.shape == (64, 32)
    assert frame[:12].mean() > 240 and frame[20:].mean() < 15


def test_nothing_packable_exits_1_and_strict_exits_2(bad_src, tmp_path):
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "zero.mp4").write_bytes(b"")
    assert run_pack("--kind", "videos", "--src", only_bad, "--out", tmp_path / "o1") == 1
    assert not load_manifest(tmp_path / "o1")["shards"]
    assert run_pack("--kind", "videos", "--src", bad_src, "--out", tmp_path / "o2", "--strict") == 2


def test_a_stream_cut_between_packets_is_reported_as_truncated(bad_src, tmp_path):
    """Cut after the 30th packet: everything left decodes cleanly, but 3 s of the declared 6 s are gone."""
    full = bad_src / "full.mp4"
    with av.open(str(full)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: packets[29].pos + packets[29].size])
    segments = video_segments(str(cut), EncodeSettings(fps=10, short_side=0), None, {}, decode_threads=1)
    with pytest.raises(BadInput, match=r"truncated: decoded 3\.00 s of the 6\.00 s"):
        list(segments)
