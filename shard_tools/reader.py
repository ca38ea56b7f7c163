"""Read samples back from a packed dataset (for inspection, verification and tests; the training
pipeline has its own fast readers built on `read_index`)."""
from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from PIL import Image

from .index import read_index
from .manifest import load_manifest


def iter_samples(dataset: str | os.PathLike) -> Iterator[tuple[Path, str, dict[str, bytes]]]:
    """Every sample of a dataset as `(tar path, key, {ext: bytes})`, in shard and index order."""
    manifest = load_manifest(dataset)
    for tar_path, idx_path in zip(manifest["tar_paths"], manifest["idx_paths"]):
        with open(tar_path, "rb") as f:
            for key, members in read_index(idx_path):
                data = {}
                for ext, (offset, size) in members.items():
                    f.seek(offset)
                    data[ext] = f.read(size)
                yield tar_path, key, data


def sample_meta(members: dict[str, bytes]) -> tuple[dict, int]:
    """A sample's parsed `json` and its `nframes.i32` value."""
    return json.loads(members["json"]), struct.unpack("<i", members["nframes.i32"])[0]


def frame_members(members: dict[str, bytes], prefix: str = "f") -> list[str]:
    """Names of the numbered image members (`f000.jpg`…, or `m000.png`… with prefix "m"), in order."""
    return sorted(ext for ext in members if ext.startswith(prefix) and ext[1:4].isdigit())


def decode_frames(members: dict[str, bytes]) -> np.ndarray:
    """A sample's frames as a (T, H, W, 3) uint8 array, from JPEG members or the mp4/webm member."""
    names = frame_members(members)
    if names:
        return np.stack([np.asarray(Image.open(io.BytesIO(members[n])).convert("RGB")) for n in names])
    data = members.get("mp4") or members.get("webm")
    if data is None:
        raise ValueError(f"sample has neither fNNN.jpg nor mp4/webm members: {sorted(members)}")
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
