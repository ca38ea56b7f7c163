"""`manifest.json`: what a dataset folder holds, how it was packed, and what was skipped and why."""
from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.json"


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write `<out_dir>/manifest.json` atomically (temporary name, then rename)."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_manifest(out_dir: str | os.PathLike, require_complete: bool = True) -> dict:
    """Read and validate a dataset folder's manifest.

    Returns the manifest dict with `tar_paths` and `idx_paths` added (absolute `Path`s, shard order).
    Raises FileNotFoundError / ValueError naming the folder and the fix when the manifest is missing,
    the packing run did not finish, or a listed shard or index is missing or has the wrong size.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not a packed dataset; "
                                f"create it with `python shard_tools/pack.py --src SOURCES --out {out_dir}`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if require_complete and not manifest.get("complete"):
        raise ValueError(f"{path}: packing did not finish; rerun the same pack.py command to resume")
    tar_paths, idx_paths = [], []
    for shard in manifest.get("shards", []):
        tar, idx = out_dir / shard["tar"], out_dir / shard["idx"]
        if not tar.is_file() or tar.stat().st_size != shard["bytes"]:
            raise ValueError(f"{tar}: listed in {path} with {shard['bytes']} bytes but "
                             f"{'missing' if not tar.is_file() else f'has {tar.stat().st_size}'}; "
                             "the dataset is damaged, repack it with pack.py --overwrite")
        if not idx.is_file():
            raise ValueError(f"{idx}: index listed in {path} is missing; rebuild it with `wds2idx {tar} {idx}`")
        tar_paths.append(tar)
        idx_paths.append(idx)
    manifest["tar_paths"], manifest["idx_paths"] = tar_paths, idx_paths
    return manifest
