"""Helpers for the shard_tools tests: tiny hand-made videos with known content."""
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest


def write_grey_video(path: Path, frames: int = 20, width: int = 64, height: int = 48, fps: int = 10,
                     codec: str = "libx264", pts: list[int] | None = None) -> Path:
    """A video whose frame i is flat grey level 10 * i. With `pts`, frame i is stamped pts[i] in
    units of 1 / (10 * fps) s (variable frame rate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"bf": "0"}
        if pts is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 10 * fps)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), (10 * i) % 256, np.uint8), format="rgb24")
            frame.pts = i if pts is None else pts[i]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def set_mp4_rotation(path: Path, degrees_ccw: int) -> None:
    """Patch the display matrix of an mp4's track header (tkhd, version 0), as phones write it, so
    that players rotate the picture `degrees_ccw` (a multiple of 90) counter-clockwise."""
    data = bytearray(path.read_bytes())
    tkhd = data.find(b"tkhd")
    assert tkhd > 0 and data[tkhd + 4] == 0, "expected a version-0 tkhd box"
    # type, version/flags, creation, modification, track id, reserved, duration, 8 reserved bytes,
    # layer, alternate group, volume, reserved; then the 3x3 matrix (a b u / c d v / x y w).
    matrix = tkhd + 4 + 4 + 4 * 5 + 8 + 8
    cos, sin = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees_ccw % 360]
    values = [cos << 16, -sin << 16, 0, sin << 16, cos << 16, 0, 0, 0, 1 << 30]
    data[matrix:matrix + 36] = np.array(values, ">i4").tobytes()
    path.write_bytes(bytes(data))


def write_noise_video(path: Path, frames: int = 60, fps: int = 10) -> Path:
    """Random-noise H.264 with the moov box first (as web videos are), so a truncated copy still opens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def luma_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of the luma (BT.601) of two RGB arrays. Sources are 4:2:0 already, so the chroma detail
    a packed 4:2:0 re-encode loses says nothing about the packing itself."""
    luma = np.array([0.299, 0.587, 0.114])
    mse = np.mean((a @ luma - b @ luma) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


@pytest.fixture(scope="session")
def psnr():
    return luma_psnr


@pytest.fixture(scope="session")
def grey_video():
    return write_grey_video


@pytest.fixture(scope="session")
def noise_video():
    return write_noise_video


@pytest.fixture(scope="session")
def rotate_mp4():
    return set_mp4_rotation
