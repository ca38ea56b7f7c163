"""The CPU decode path: PIL for JPEG frames, PyAV for H.264 / VP9 samples, in DataLoader workers.

It decodes exactly the frames `pipeline.source.ClipSource` planned and hands them, with the same
packed parameters, to the same renderer (`pipeline.views.render`) as the DALI path, so both produce
the same batches up to decoder rounding. Batch i of a rank covers stream positions
[start + i*B, start + (i+1)*B): a pure function of its index, so any number of workers gives the
same batches in the same order.
"""
from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

from pipeline import params as P
from pipeline.source import ClipSource, CorruptSample
from pipeline.views import render


def decode_jpeg(data: np.ndarray) -> np.ndarray:
    """Encoded JPEG -> (H, W, 3) uint8 RGB."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptSample(f"JPEG decode failed: {err}") from err


def decode_video(data: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Frames `indices` (ascending) of an encoded mp4/webm -> (T, H, W, 3) uint8 RGB.

    Seeks to the keyframe before the first wanted frame (packed clips have short closed GOPs and a
    constant frame rate, so a frame's index is its timestamp times the rate), then decodes forward.
    """
    import av

    wanted = {int(i): k for k, i in enumerate(indices)}
    out: list[np.ndarray | None] = [None] * len(indices)
    try:
        with av.open(io.BytesIO(data.tobytes())) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate, base = Fraction(stream.average_rate), Fraction(stream.time_base)
            first_pts = stream.start_time or 0
            if indices[0] > 0:
                container.seek(first_pts + int(Fraction(int(indices[0])) / rate / base), stream=stream,
                               backward=True)
            for frame in container.decode(stream):
                index = round((frame.pts - first_pts) * base * rate)
                if index in wanted:
                    out[wanted[index]] = frame.to_ndarray(format="rgb24")
                if index >= indices[-1]:
                    break
    except av.error.FFmpegError as err:
        raise CorruptSample(f"video decode failed: {err}") from err
    missing = [int(i) for i, frame in zip(indices, out) if frame is None]
    if missing:
        raise CorruptSample(f"video ends before frames {missing}")
    return np.stack(out)


def stack_frames(frames: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) frames -> (F, Hmax, Wmax, 3), zero-padded at the bottom/right when sizes differ
    (boxes never reach into the padding: they were drawn inside each frame)."""
    height = max(f.shape[0] for f in frames)
    width = max(f.shape[1] for f in frames)
    out = np.zeros((len(frames), height, width, 3), dtype=np.uint8)
    for k, f in enumerate(frames):
        out[k, :f.shape[0], :f.shape[1]] = f
    return torch.from_numpy(out)


class CpuBatches(torch.utils.data.Dataset):
    """Batch i of the stream: decoded with PIL / PyAV, rendered here when `render_here`."""

    def __init__(self, source: ClipSource, batch_size: int, start: int, render_here: bool, dtype: torch.dtype):
        self.source, self.batch_size, self.start = source, batch_size, start
        self.render_here, self.dtype = render_here, dtype

    def __len__(self) -> int:  # endless in practice; the sampler decides how many are read
        return 2 ** 62

    def decode(self, position: int) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
        """Packed row, decoded frames and skipped sample ids of one stream position."""
        while True:
            planned, skipped = self.source.plan(position)   # re-planned after a failure: skips it
            try:
                if self.source.dataset.format == "jpeg":
                    frames = [decode_jpeg(f) for f in planned.frames]
                else:
                    frames = list(decode_video(planned.frames[0], planned.indices))
                return planned.row, frames, skipped
            except CorruptSample as err:
                self.source.mark_bad(planned.sample_id, str(err))

    def __getitem__(self, i: int) -> dict:
        rows, frames, skipped = [], [], []   # skipped: sample ids
        first = self.start + i * self.batch_size
        for position in range(first, first + self.batch_size):
            row, decoded, skips = self.decode(position)
            rows.append(row)
            frames += decoded
            skipped += skips
        item = {"frames": stack_frames(frames), "params": torch.from_numpy(np.stack(rows)), "skipped": skipped}
        if self.render_here:
            item["batch"] = render(item.pop("frames"), P.unpack(self.source.spec, item.pop("params")),
                                   self.source.spec, self.dtype)
        return item
