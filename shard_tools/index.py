"""DALI's WebDataset index (`wds2idx` format v1.2), written at pack time and parsed for readers.

Layout: a first line `v1.2 <num_samples>`, then one line per sample that lists each member as
`<ext> <data offset> <size> <member name>`, separated by spaces. Offsets point at the member's data
(past its 512-byte tar header), exactly as DALI's own `wds2idx` writes them.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

INDEX_VERSION = "v1.2"

Member = tuple[str, int, int]              # (extension, data offset, size)
IndexEntry = tuple[str, dict[str, tuple[int, int]]]   # (key, {ext: (offset, size)})


def split_member_name(name: str) -> tuple[str, str]:
    """`key.ext.with.dots` -> (`key`, `ext.with.dots`): the extension starts at the first dot."""
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".")
    if dot < 0:
        return name, ""
    return name[: len(name) - len(base) + dot], base[dot + 1:]


def format_index(samples: list[tuple[str, list[Member]]]) -> str:
    """Index text for samples given as `(key, [(ext, offset, size), ...])` in tar order."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for key, members in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {key}.{ext}" for ext, offset, size in members))
    return "\n".join(lines) + "\n"


def write_index(idx_path: str | os.PathLike, samples: list[tuple[str, list[Member]]]) -> None:
    """Write the index atomically (temporary name, then rename)."""
    idx_path = Path(idx_path)
    tmp = idx_path.with_name(idx_path.name + ".partial")
    tmp.write_text(format_index(samples), encoding="utf-8")
    os.replace(tmp, idx_path)


def read_index(idx_path: str | os.PathLike) -> list[IndexEntry]:
    """Parse an index into `[(key, {ext: (offset, size)})]`, in tar order.

    Raises ValueError naming the file when it is not a v1.2 index or its sample count is wrong.
    """
    lines = Path(idx_path).read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].startswith(INDEX_VERSION + " "):
        raise ValueError(f"{idx_path}: not a DALI {INDEX_VERSION} index (first line {lines[:1]!r}); "
                         "rebuild it with `wds2idx <tar> <idx>`")
    declared = int(lines[0].split()[1])
    entries: list[IndexEntry] = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) % 4:
            raise ValueError(f"{idx_path}:{lineno}: expected groups of 4 fields, got {len(fields)}")
        members: dict[str, tuple[int, int]] = {}
        key = None
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i:i + 4]
            key = split_member_name(name)[0]
            members[ext] = (int(offset), int(size))
        entries.append((key, members))
    if len(entries) != declared:
        raise ValueError(f"{idx_path}: header declares {declared} samples but lists {len(entries)}")
    return entries


def index_tar(tar_path: str | os.PathLike) -> list[tuple[str, list[Member]]]:
    """Build the index of an existing tar by scanning its headers (regular files only, grouped
    by consecutive key, hidden files skipped), the way `wds2idx` groups them."""
    samples: list[tuple[str, list[Member]]] = []
    with tarfile.open(tar_path, "r:") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, ext = split_member_name(info.name)
            if not key or key.endswith("/"):
                continue
            if samples and samples[-1][0] == key:
                samples[-1][1].append((ext, info.offset_data, info.size))
            else:
                samples.append((key, [(ext, info.offset_data, info.size)]))
    return samples
