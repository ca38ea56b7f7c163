"""`ClipSource`: stream position -> (encoded frames or video, packed parameters) for both backends.

It picks the sample (`pipeline.sampling`), draws its parameters (`pipeline.params`) and slices the
encoded bytes out of the mmap'ed shard (`pipeline.reader`). A sample that cannot be used (a frame
that is not a JPEG, a decode failure reported back by the CPU path) is skipped, logged with shard
and key, counted, and replaced by the next sample of the rank's epoch order with a fresh draw; the
replacement is a pure function of the position, so batches stay reproducible. A missing component
(no `nframes.i32`, no frame `f007.jpg`) is a damaged dataset and raises `SampleError`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline import params as P
from pipeline.reader import SampleError, ShardDataset, frame_member, jpeg_size
from pipeline.sampling import EpochOrder, clip_span, frame_indices, sample_rng
from pipeline.views import ViewSpec

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 16


class CorruptSample(Exception):
    """Raised by a decoder for bytes it cannot decode; the source skips and replaces the sample."""


@dataclass
class Planned:
    """One sample ready to decode: its encoded payload and its packed parameters."""

    sample_id: int
    row: np.ndarray               # pipeline.params.pack(...)
    frames: list[np.ndarray]      # T encoded JPEG frames, or [the whole mp4/webm] for video samples
    indices: np.ndarray           # the T frame indices (for video decoders)


def _looks_like_jpeg(data: np.ndarray) -> bool:
    return len(data) > 4 and data[-2] == 0xFF and data[-1] == 0xD9 and jpeg_size(data.data) is not None


class ClipSource:
    """Plans the samples of one rank. Picklable (the shard maps reopen in each worker)."""

    def __init__(self, dataset: ShardDataset, spec: ViewSpec, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        self.dataset, self.spec, self.rank, self.seed = dataset, spec, rank, seed
        self.usable = dataset.usable(clip_span(spec.frames, spec.stride))
        self.order = EpochOrder(len(self.usable), rank, world_size, seed, shuffle)
        self.bad: set[int] = set()   # samples found corrupt in this process, not decoded again

    def plan(self, position: int) -> tuple[Planned, list[int]]:
        """The sample at a stream position, replaced while corrupt; also the ids of skipped samples
        (their count and the last one are also written into the row's meta)."""
        epoch, index, _ = self.order.locate(position)
        skipped: list[int] = []
        for attempt in range(MAX_REPLACEMENTS):
            order = self.order.epoch(epoch)
            sample_id = int(self.usable[order[(index + attempt) % len(order)]])
            if sample_id in self.bad:
                skipped.append(sample_id)
                continue
            try:
                planned = self._plan(sample_id, sample_rng(self.seed, self.rank, epoch, index, attempt))
            except CorruptSample as err:
                self.mark_bad(sample_id, str(err))
                skipped.append(sample_id)
                continue
            planned.row[3], planned.row[4] = len(skipped), skipped[-1] if skipped else -1
            return planned, skipped
        raise RuntimeError(f"{self.dataset.path}: {MAX_REPLACEMENTS} consecutive samples are corrupt "
                           f"(last: {self.dataset.where(skipped[-1])}); check the dataset with shard_tools/inspect.py")

    def mark_bad(self, sample_id: int, reason: str) -> None:
        self.bad.add(sample_id)
        log.warning("skipping corrupt sample %s: %s", self.dataset.where(sample_id), reason)

    def _plan(self, sample_id: int, rng: np.random.Generator) -> Planned:
        ds, spec = self.dataset, self.spec
        nframes = ds.nframes(sample_id)
        if ds.format == "jpeg":
            size = jpeg_size(ds.member(sample_id, frame_member(0)))
            if size is None:
                raise CorruptSample(f"{frame_member(0)} is not a JPEG")
            width, height = size
        else:
            width, height = ds.frame_size(sample_id)
        drawn = P.draw(spec, rng, width, height, nframes, ds.label(sample_id), sample_id)
        indices = frame_indices(int(drawn["meta"][2]), spec.frames, spec.stride)
        if ds.format == "jpeg":
            frames = [ds.array(sample_id, frame_member(int(i))) for i in indices]
            for i, data in zip(indices, frames):
                if not _looks_like_jpeg(data):
                    raise CorruptSample(f"{frame_member(int(i))} is not a complete JPEG")
        else:
            frames = [ds.array(sample_id, ds.video_ext(sample_id))]
        return Planned(sample_id, P.pack(spec, drawn), frames, indices)
