"""Random access to the members of a packed dataset: the pack-time `.idx` files give each member's
offset and size, the tars are mmap'ed, so reading a member is a slice (no tar parsing, no copy).

The index is held in flat numpy arrays (one row per member: extension id, offset, size), not in a
dict per sample: a JPEG-frame dataset has ~35 members per sample, and Kinetics-sized datasets would
otherwise cost ~1 GB of Python objects in every reader process. The maps are opened lazily per
process: the object pickles without them, so DataLoader and DALI external-source workers each map
the shards themselves.
"""
from __future__ import annotations

import json
import logging
import mmap
from pathlib import Path

import numpy as np

from shard_tools.index import read_index
from shard_tools.manifest import load_manifest

log = logging.getLogger(__name__)

VIDEO_EXTS = ("mp4", "webm")


class SampleError(ValueError):
    """A sample cannot be used: the message names the shard and the key."""


def frame_member(index: int) -> str:
    """Name of frame `index` of a JPEG-frames sample (`f000.jpg` ...)."""
    return f"f{index:03d}.jpg"


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) of a JPEG whose header is complete (start-of-frame, then a start-of-scan
    marker), else None: truncated or non-JPEG bytes are caught here, before any decoder sees them."""
    buf = bytes(data[:65536])
    if buf[:2] != b"\xff\xd8":
        return None
    size, at = None, 2
    while at + 4 <= len(buf):
        if buf[at] != 0xFF:
            return None
        marker = buf[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xDA:  # start of scan: the header is complete
            return size
        length = int.from_bytes(buf[at + 2:at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and at + 9 <= len(buf):
            height = int.from_bytes(buf[at + 5:at + 7], "big")
            width = int.from_bytes(buf[at + 7:at + 9], "big")
            size = (width, height) if width and height else None
        at += 2 + length
    return None


class ShardDataset:
    """The samples of a dataset folder and their members.

    format: "jpeg" (frame members; also evaluation datasets, packed as "original" JPEG bytes),
    "h264" or "vp9" (one `mp4`/`webm` member), from the manifest.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = load_manifest(self.path)
        fmt = manifest.get("format", "jpeg")
        self.format = "jpeg" if fmt == "original" else fmt
        self.tar_paths = [Path(p) for p in manifest["tar_paths"]]
        self.exts: list[str] = []                    # extension vocabulary
        ext_ids: dict[str, int] = {}
        keys, shards, counts, rows = [], [], [], []
        for shard, idx in enumerate(manifest["idx_paths"]):
            for key, members in read_index(idx):
                keys.append(key)
                shards.append(shard)
                counts.append(len(members))
                rows += [(ext_ids.setdefault(ext, len(ext_ids)), offset, size)
                         for ext, (offset, size) in members.items()]
        if not keys:
            raise ValueError(f"{self.path}: the manifest lists no samples; pack some videos into it first")
        self.exts = list(ext_ids)
        self.keys = keys
        self.shard_of = np.array(shards, dtype=np.int32)
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        table = np.array(rows, dtype=np.int64)
        self.member_ext, self.member_offset, self.member_size = table[:, 0].astype(np.int32), table[:, 1], table[:, 2]
        self._ext_ids = ext_ids
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def where(self, sample_id: int) -> str:
        """`shard.tar:key` for messages."""
        return f"{self.tar_paths[self.shard_of[sample_id]].name}:{self.keys[sample_id]}"

    def members(self, sample_id: int) -> list[str]:
        """The extensions of a sample's members."""
        rows = slice(self.first[sample_id], self.first[sample_id + 1])
        return [self.exts[e] for e in self.member_ext[rows]]

    def _row(self, sample_id: int, ext: str) -> int | None:
        """Index of member `ext` of a sample in the flat member table, None when absent."""
        ext_id = self._ext_ids.get(ext)
        first = int(self.first[sample_id])
        hits = np.flatnonzero(self.member_ext[first:self.first[sample_id + 1]] == ext_id) if ext_id is not None else ()
        return first + int(hits[0]) if len(hits) else None

    def has(self, sample_id: int, ext: str) -> bool:
        return self._row(sample_id, ext) is not None

    def member(self, sample_id: int, ext: str) -> memoryview:
        """The bytes of one member (a view into the mmap'ed tar)."""
        row = self._row(sample_id, ext)
        if row is None:
            raise SampleError(f"{self.where(sample_id)} has no '{ext}' member (it has "
                              f"{sorted(self.members(sample_id))}); the shard is damaged or was not written by "
                              "shard_tools/pack.py; repack it")
        shard = int(self.shard_of[sample_id])
        if shard not in self._maps:
            with open(self.tar_paths[shard], "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        offset = int(self.member_offset[row])
        return memoryview(self._maps[shard])[offset:offset + int(self.member_size[row])]

    def array(self, sample_id: int, ext: str) -> np.ndarray:
        """One member as a uint8 array (no copy)."""
        return np.frombuffer(self.member(sample_id, ext), dtype=np.uint8)

    def nframes(self, sample_id: int) -> int:
        return int(np.frombuffer(self.member(sample_id, "nframes.i32"), dtype="<i4")[0])

    def label(self, sample_id: int) -> int:
        """Class id from `label.i32`, -1 when the sample is unlabelled."""
        if not self.has(sample_id, "label.i32"):
            return -1
        return int(np.frombuffer(self.member(sample_id, "label.i32"), dtype="<i4")[0])

    def video_ext(self, sample_id: int) -> str:
        for ext in VIDEO_EXTS:
            if self.has(sample_id, ext):
                return ext
        raise SampleError(f"{self.where(sample_id)} has no mp4 or webm member (it has {sorted(self.members(sample_id))}); "
                          f"the manifest says format {self.format!r}; repack it")

    def frame_size(self, sample_id: int) -> tuple[int, int]:
        """(width, height) of a video sample, from its `json`."""
        meta = json.loads(bytes(self.member(sample_id, "json")))
        return int(meta["width"]), int(meta["height"])

    def usable(self, span: int) -> np.ndarray:
        """Ids of the samples with at least `span` frames; the others are counted and logged."""
        counts = np.array([self.nframes(i) for i in range(len(self))])
        keep = np.flatnonzero(counts >= span)
        if len(keep) < len(self):
            short = np.flatnonzero(counts < span)
            log.warning("%s: %d of %d samples have fewer than %d frames (the clip span) and are not read, "
                        "e.g. %s with %d frames; pack longer segments or lower frames/stride",
                        self.path, len(short), len(self), span, self.where(int(short[0])), counts[short[0]])
        if len(keep) == 0:
            raise ValueError(f"{self.path}: no sample has the {span} frames a clip spans "
                             f"(longest: {counts.max()}); pack longer segments or lower frames/stride")
        return keep
