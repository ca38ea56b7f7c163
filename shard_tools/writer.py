"""Byte-reproducible tar writing: samples (`key` + `{ext: bytes}`) into shards with DALI indexes.

Every member gets mtime 0, uid/gid 0, user/group "bigdata" and mode 0o444, and a sample's members
are written adjacently in sorted extension order, so the same samples give the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .index import Member, write_index

PARTIAL_SUFFIX = ".partial"


class SampleTar:
    """A plain (uncompressed) ustar file that samples are appended to; tracks member data offsets."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
        self.samples: list[tuple[str, list[Member]]] = []

    def add(self, key: str, members: dict[str, bytes]) -> list[Member]:
        """Append one sample; returns its `(ext, data offset, size)` list."""
        written: list[Member] = []
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = "bigdata"
            self._tar.addfile(info, io.BytesIO(data))
            # After addfile the archive offset sits past the data, padded to a 512-byte block.
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            written.append((ext, self._tar.offset - padded, len(data)))
        self.samples.append((key, written))
        return written

    @property
    def size(self) -> int:
        """Bytes written so far (before the end-of-archive blocks)."""
        return self._tar.offset

    def close(self) -> None:
        self._tar.close()


@dataclass
class ShardRecord:
    """What the manifest lists for one finished shard."""
    tar: str
    idx: str
    samples: int
    frames: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes `<out>/<name>-000000.tar` (+ `.idx`) shards of about `max_bytes` each.

    A shard is written as `<name>-NNNNNN.tar.partial` and renamed only once it is complete and its
    index is on disk, so a killed run never leaves a truncated shard under a real name.
    `on_shard(record)` is called after each rename.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, max_bytes: int,
                 on_shard: Callable[[ShardRecord], None] | None = None):
        self.out_dir, self.name, self.max_bytes = Path(out_dir), name, max_bytes
        self.on_shard = on_shard
        self.records: list[ShardRecord] = []
        self._tar: SampleTar | None = None
        self._frames = 0

    def write(self, key: str, members: dict[str, bytes], nframes: int) -> None:
        """Add one sample, starting a new shard first if this one would grow past `max_bytes`."""
        # 1 KiB per member covers its header and padding.
        sample_bytes = sum(len(v) for v in members.values()) + 1024 * len(members)
        if self._tar is not None and self._tar.samples and self._tar.size + sample_bytes > self.max_bytes:
            self._finish()
        if self._tar is None:
            tar_name = f"{self.name}-{len(self.records):06d}.tar"
            self._tar = SampleTar(self.out_dir / (tar_name + PARTIAL_SUFFIX))
            self._frames = 0
        self._tar.add(key, members)
        self._frames += nframes

    def close(self) -> list[ShardRecord]:
        """Finish the last shard; returns the records of all shards written."""
        if self._tar is not None:
            self._finish()
        return self.records

    def _finish(self) -> None:
        tar = self._tar
        assert tar is not None
        tar.close()
        final = tar.path.with_name(tar.path.name[: -len(PARTIAL_SUFFIX)])
        idx = final.with_suffix(".idx")
        write_index(idx, tar.samples)
        os.replace(tar.path, final)
        record = ShardRecord(tar=final.name, idx=idx.name, samples=len(tar.samples), frames=self._frames,
                             bytes=final.stat().st_size, sha256=sha256_file(final))
        self.records.append(record)
        self._tar = None
        if self.on_shard is not None:
            self.on_shard(record)
