"""Decode with PyAV at a constant frame rate and size, and encode samples as JPEG frames, H.264 or VP9.

Everything here works on one source at a time and streams: a decoded frame is converted only when
it is emitted, and a segment is encoded frame by frame, so memory stays bounded by one segment's
encoded bytes whatever the length or resolution of the source.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import numpy as np
from PIL import Image

FORMATS = ("jpeg", "h264", "vp9")
MAX_FRAMES_PER_SAMPLE = 1000      # f000.jpg … f999.jpg (design.md §1)
_EPS = 1e-6                        # seconds; absorbs float error in rational timestamps


class BadInput(Exception):
    """A source that cannot be packed; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class EncodeSettings:
    """How samples are encoded; recorded in every sample's `json` and in the manifest."""
    format: str = "jpeg"
    fps: float = 30.0
    short_side: int = 256          # 0 keeps the source size (rounded down to even)
    quality: int = 90              # JPEG quality
    crf: int = 23                  # H.264 / VP9 constant-quality factor
    gop: int = 16                  # closed GOP length (frames) for H.264 / VP9
    preset: str = "fast"           # x264 preset
    threads: int = 1               # encoder threads per worker (fixed so output is reproducible)

    def encoder_info(self) -> dict:
        if self.format == "jpeg":
            return {"codec": "jpeg", "quality": self.quality}
        if self.format == "h264":
            return {"codec": "libx264", "profile": "high", "pix_fmt": "yuv420p", "crf": self.crf,
                    "preset": self.preset, "gop": self.gop, "bframes": 0, "closed_gop": True,
                    "container": "mp4"}
        return {"codec": "libvpx-vp9", "profile": 0, "pix_fmt": "yuv420p", "crf": self.crf,
                "gop": self.gop, "deadline": "realtime", "cpu_used": 8, "closed_gop": True,
                "container": "webm"}


@dataclass(frozen=True)
class VideoInfo:
    """What probing a video file found (sizes are after rotation)."""
    duration: float
    fps: float
    width: int
    height: int
    rotation: int
    codec: str


def even_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Output (width, height): short side scaled to `short_side` (0: unchanged), both even."""
    if short_side:
        scale = short_side / min(width, height)
        width, height = width * scale, height * scale
    return max(2, int(round(width / 2)) * 2), max(2, int(round(height / 2)) * 2)


def _open(path: str):
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, OSError) as err:
        raise BadInput(f"cannot open as a video: {err}") from None
    if not container.streams.video:
        container.close()
        raise BadInput("no video stream")
    return container


def probe_video(path: str) -> VideoInfo:
    """Read container metadata and decode the first frame (to learn its rotation and check the codec)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = float("nan")
        try:
            first = next(container.decode(stream))
        except StopIteration:
            raise BadInput("the video stream holds no decodable frame") from None
        except av.FFmpegError as err:
            raise BadInput(f"undecodable video stream ({stream.codec_context.name}): {err}") from None
        rotation = int(round(first.rotation or 0)) % 360
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(duration=duration, fps=float(rate) if rate else float("nan"), width=width,
                         height=height, rotation=rotation, codec=stream.codec_context.name)


def _to_rgb(frame: av.VideoFrame, rotation: int, size: tuple[int, int]) -> np.ndarray:
    """Scale (area filter) and rotate a decoded frame to an (H, W, 3) uint8 array of `size`."""
    width, height = size
    if rotation in (90, 270):
        width, height = height, width
    if (frame.width, frame.height) != (width, height):
        # Scaling in the decoder's pixel format (half the bytes of RGB for 4:2:0) and converting
        # afterwards is ~1.7x faster than swscale doing both in one call.
        frame = frame.reformat(width=width, height=height, interpolation="AREA")
    rgb = frame.to_ndarray(format="rgb24")
    # `rotation` is the display matrix's counter-clockwise angle, np.rot90's direction too.
    return np.ascontiguousarray(np.rot90(rgb, rotation // 90)) if rotation else rgb


def iter_video_frames(path: str, fps: float, short_side: int, info: VideoInfo,
                      stats: dict | None = None, threads: int = 0) -> Iterator[np.ndarray]:
    """Yield the video's frames resampled to a constant `fps`, scaled and rotated, as RGB arrays.

    Output frame i shows the source frame on screen at time i / fps (from the first frame's
    timestamp): frames are repeated or dropped by timestamp, so variable-frame-rate sources come out
    at a constant rate. The last source frame lasts one average frame interval. Decode errors raise
    BadInput; `stats["decoded_seconds"]` tracks how far decoding got. `threads` decoder threads
    (0: one per core); the frames are the same whatever the count.
    """
    size = even_size(info.width, info.height, short_side)
    stats = stats if stats is not None else {}
    default_step = 1.0 / info.fps if info.fps and math.isfinite(info.fps) else 1.0 / fps
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        t0, prev, prev_t, out_index = None, None, 0.0, 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else index * default_step
                if t0 is None:
                    t0 = t
                t -= t0
                if prev is not None and t <= prev_t:      # duplicate or out-of-order stamp: keep newest
                    prev = frame
                    continue
                while prev is not None and out_index / fps < t - _EPS:
                    yield _to_rgb(prev, info.rotation, size)
                    out_index += 1
                prev, prev_t = frame, t
                stats["decoded_seconds"] = t
        except av.FFmpegError as err:
            raise BadInput(f"decode error after {stats.get('decoded_seconds', 0.0):.2f} s: {err}") from None
        if prev is None:
            raise BadInput("no decodable frame")
        end = prev_t + default_step
        while out_index / fps < end - _EPS:
            yield _to_rgb(prev, info.rotation, size)
            out_index += 1
        stats["decoded_seconds"] = end


def resize_rgb(image: Image.Image, short_side: int) -> np.ndarray:
    """A PIL image as an (H, W, 3) uint8 array with its short side at `short_side`, even sizes."""
    size = even_size(image.width, image.height, short_side)
    image = image.convert("RGB")
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(image)


class SegmentEncoder:
    """Encodes one sample's frames as they arrive; `finish()` returns its payload members.

    JPEG: `{"f000.jpg": …}`. H.264: `{"mp4": …}` (High, yuv420p, closed GOP of `gop` frames with an
    IDR at each start, no B-frames, no scene-cut keyframes). VP9: `{"webm": …}` (profile 0, yuv420p,
    keyframe every `gop` frames). A new encoder per sample makes every sample start on a keyframe.
    """

    def __init__(self, settings: EncodeSettings):
        self.settings = settings
        self.nframes = 0
        self.size: tuple[int, int] | None = None      # (width, height) of the frames added
        self._jpegs: dict[str, bytes] = {}
        self._buffer: io.BytesIO | None = None
        self._container = self._stream = None

    def add(self, rgb: np.ndarray) -> None:
        size = (rgb.shape[1], rgb.shape[0])
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise ValueError(f"frame size {size} differs from the sample's {self.size}")
        if self.settings.format == "jpeg":
            if self.nframes >= MAX_FRAMES_PER_SAMPLE:
                raise ValueError(f"a JPEG sample holds at most {MAX_FRAMES_PER_SAMPLE} frames")
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=self.settings.quality)
            self._jpegs[f"f{self.nframes:03d}.jpg"] = buf.getvalue()
        else:
            if self._stream is None:
                self._open_encoder(*size)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = self.nframes
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self.nframes += 1

    def _open_encoder(self, width: int, height: int) -> None:
        s = self.settings
        self._buffer = io.BytesIO()
        container_format, codec = ("mp4", "libx264") if s.format == "h264" else ("webm", "libvpx-vp9")
        self._container = av.open(self._buffer, "w", format=container_format)
        # An integer-ish rational rate; 29.97 stays exact as 30000/1001.
        rate = Fraction(s.fps).limit_denominator(1001)
        stream = self._container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = 1 / rate
        stream.codec_context.gop_size = s.gop
        common = {"threads": str(s.threads), "keyint_min": str(s.gop), "crf": str(s.crf)}
        if s.format == "h264":
            stream.options = {**common, "profile": "high", "preset": s.preset, "bf": "0",
                              "sc_threshold": "0", "x264-params": "open-gop=0:scenecut=0"}
        else:
            stream.options = {**common, "b": "0", "deadline": "realtime", "cpu-used": "8",
                              "row-mt": "0", "lag-in-frames": "0", "auto-alt-ref": "0"}
        self._stream = stream

    def finish(self) -> dict[str, bytes]:
        if self.settings.format == "jpeg":
            return self._jpegs
        if self._stream is None:
            raise ValueError("cannot encode an empty sample")
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        return {"mp4" if self.settings.format == "h264" else "webm": self._buffer.getvalue()}
