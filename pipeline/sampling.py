"""Which samples a rank reads, in which order, and which frames of a sample make a clip.

The epoch order is a permutation of the whole dataset drawn from `(seed, epoch)`, the same on every
rank; rank r takes every `world_size`-th entry from position r, so ranks read disjoint samples that
together cover the dataset every epoch (their epoch lengths differ by at most one sample). The loader
is an endless stream: stream position p of a rank is sample `order(p // n)[p % n]` with n the rank's
epoch length, so a position is all the state an exact resume needs.
"""
from __future__ import annotations

import numpy as np


def clip_span(frames: int, stride: int) -> int:
    """Packed frames covered by T frames at stride S: (T - 1) * S + 1."""
    return (frames - 1) * stride + 1


def draw_start(rng: np.random.Generator, nframes: int, frames: int, stride: int) -> int:
    """A uniformly random start with start + span <= nframes (the caller guarantees the clip fits)."""
    return int(rng.integers(0, nframes - clip_span(frames, stride) + 1))


def frame_indices(start: int, frames: int, stride: int) -> np.ndarray:
    """Indices of the T frames of a clip starting at `start`."""
    return start + stride * np.arange(frames)


def sample_rng(seed: int, rank: int, epoch: int, index: int, attempt: int = 0) -> np.random.Generator:
    """The generator every augmentation parameter of one sample is drawn from.

    Keyed by position, not by worker or batch, so batches do not depend on the number of workers,
    the backend or the batch size, and a resumed run draws exactly what the uninterrupted one drew.
    """
    return np.random.default_rng([seed, rank, epoch, index, attempt])


class EpochOrder:
    """The samples rank `rank` of `world_size` reads, epoch after epoch."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} usable samples cannot feed {world_size} ranks; "
                             "pack more data or use fewer processes")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch_length = len(range(rank, num_samples, world_size))
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch(self, epoch: int) -> np.ndarray:
        """Sample ids this rank reads in `epoch`, in reading order."""
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._cached = (epoch, order[self.rank::self.world_size])
        return self._cached[1]

    def locate(self, position: int) -> tuple[int, int, int]:
        """Stream position -> (epoch, index in the rank's epoch, sample id)."""
        epoch, index = divmod(position, self.epoch_length)
        return epoch, index, int(self.epoch(epoch)[index])
