"""Pipeline test data (helpers; fixtures in conftest.py): tiny datasets whose pixels say where they come from.

`ramp_shards`: JPEG-frame samples of W x H = 64 x 48 where red = 10 * frame index, green encodes x
and blue encodes y (linear ramps), so a view's pixels tell which frame and which box it came from.
Written with shard_tools' writer, so the format is the packed one.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shard_tools.manifest import write_manifest
from shard_tools.writer import ShardWriter

WIDTH, HEIGHT = 64, 48
RAMP_NFRAMES = [12, 16, 20, 9, 14, 18, 11]
RAMP_LABELS = [0, 1, -1, 2, 0, -1, 1]


def ramp_frame(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([np.full((height, width), 10.0 * index), x, y], -1).round().astype(np.uint8)


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def ramp_members(nframes: int, label: int) -> dict[str, bytes]:
    members = {f"f{i:03d}.jpg": jpeg_bytes(ramp_frame(i)) for i in range(nframes)}
    members["nframes.i32"] = np.int32(nframes).tobytes()
    members["json"] = json.dumps({"width": WIDTH, "height": HEIGHT, "nframes": nframes}).encode()
    if label >= 0:
        members["label.i32"] = np.int32(label).tobytes()
        members["cls"] = str(label).encode()
    return members


def write_dataset(out: Path, samples: list[tuple[str, dict[str, bytes], int]], fmt: str = "jpeg",
                  shard_bytes: int = 60_000) -> Path:
    """Shards + indexes + manifest of `(key, members, nframes)` samples, in this order."""
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, "test", shard_bytes)
    for key, members, nframes in samples:
        writer.write(key, members, nframes)
    shards = writer.close()
    write_manifest(out, {"name": "test", "format": fmt, "shards": [r.as_dict() for r in shards],
                         "samples": len(samples), "frames": sum(n for *_, n in samples), "complete": True})
    return out


def ramp_samples() -> list[tuple[str, dict[str, bytes], int]]:
    return [(f"ramp_v{i}_00000", ramp_members(n, label), n)
            for i, (n, label) in enumerate(zip(RAMP_NFRAMES, RAMP_LABELS))]


def to_unit(x: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """Undo the normalisation of (..., 3, h, w) views: back to [0, 1]."""
    shape = (3, 1, 1)
    return x.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)


def truncated_header(image) -> bytes:
    """A JPEG cut before its scan, with an end marker: caught by the header check."""
    data = jpeg_bytes(image)
    return data[:data.find(b"\xff\xda") - 10] + b"\xff\xd9"


def bogus_tables(image) -> bytes:
    """A structurally complete JPEG whose Huffman table is invalid: only decoding finds out."""
    data = bytearray(jpeg_bytes(image))
    dht = data.find(b"\xff\xc4")
    data[dht + 5:dht + 21] = b"\xff" * 16
    return bytes(data)


def corrupt_members(damage, n=6):
    members = ramp_members(n, 0)
    members.update({f"f{i:03d}.jpg": damage(ramp_frame(i)) for i in range(n)})
    return members
