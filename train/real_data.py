"""Real videos for the learning benchmark: `python -m train.learning --train-data SRC ... --eval-data DAVIS_DIR`.

An input is `PATH`, or `PATH:NAME,NAME,...` to choose sequences of a DAVIS-layout folder:

    a video file or a folder of video files     packed with shard_tools/pack.py --kind videos
    a DAVIS-layout folder (JPEGImages/480p/)    its frames packed with --kind frames (masks not used)
    a packed dataset folder (manifest.json)     used as it is

`--eval-data` is one DAVIS-layout folder (masks in Annotations/480p/), optionally with chosen
sequences; the benchmark scores a folder of links to them. Training on the sequences that are
scored is refused: the names of every training source (DAVIS sequences, video file names, the
videos of packed datasets) are compared with the scored sequences' names.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from shard_tools.index import read_index
from shard_tools.keys import sanitize_key, short_hash
from shard_tools.manifest import MANIFEST, load_manifest, write_manifest
from shard_tools.sources import VIDEO_EXTENSIONS, find_videos

REPO_ROOT = Path(__file__).resolve().parent.parent
DAVIS_FRAMES, DAVIS_MASKS = Path("JPEGImages") / "480p", Path("Annotations") / "480p"


class InputError(ValueError):
    """A --train-data / --eval-data argument the benchmark cannot use (reported in one line, exit 2)."""


@dataclass(frozen=True)
class RealData:
    """How the benchmark packs real training inputs for a budget (shard_tools/pack.py options)."""

    short_side: int
    clip_seconds: float   # samples of this length: a few long videos become enough samples for an epoch
    fps: float = 24.0     # DAVIS's frame rate; videos are resampled to it


@dataclass(frozen=True)
class Input:
    """One --train-data / --eval-data argument: `kind` is video, videos, davis or shards."""

    path: Path
    kind: str
    sequences: tuple[str, ...] = ()   # davis: the chosen sequences (all of the folder when none is named)

    def __str__(self) -> str:
        return f"{self.path}:{','.join(self.sequences)}" if self.kind == "davis" else str(self.path)


def davis_sequences(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / DAVIS_FRAMES).iterdir() if p.is_dir() and not p.name.startswith("."))


def parse_input(text: str) -> Input:
    """`PATH` or `PATH:NAME,...`; raises InputError naming what is wrong."""
    path, names = Path(text), ()
    if not path.exists() and ":" in text:
        head, _, tail = text.rpartition(":")
        path, names = Path(head), tuple(n for n in tail.split(",") if n)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise InputError(f"{path}: not a video file (known extensions: {' '.join(sorted(VIDEO_EXTENSIONS))})")
        kind = "video"
    elif (path / MANIFEST).is_file():
        kind = "shards"
    elif (path / DAVIS_FRAMES).is_dir():
        present = davis_sequences(path)
        missing = sorted(set(names) - set(present))
        if missing:
            raise InputError(f"{path}: no sequence {', '.join(missing)} in {DAVIS_FRAMES} (it has {' '.join(present)})")
        return Input(path, "davis", names or tuple(present))
    elif find_videos(path)[0]:
        kind = "videos"
    else:
        raise InputError(f"{path}: neither a video file, a folder of videos, a DAVIS-layout folder "
                         f"({DAVIS_FRAMES}/<sequence>/*.jpg) nor a packed dataset ({MANIFEST})")
    if names:
        raise InputError(f"{text}: sequences can be chosen (PATH:NAME,...) in DAVIS-layout folders only")
    return Input(path, kind)


def parse_eval_input(text: str) -> Input:
    scored = parse_input(text)
    if scored.kind != "davis":
        raise InputError(f"--eval-data {scored.path}: not a DAVIS-layout folder ({DAVIS_FRAMES}/<sequence>/)")
    unmasked = [n for n in scored.sequences if not (scored.path / DAVIS_MASKS / n).is_dir()]
    if unmasked:
        raise InputError(f"--eval-data {scored.path}: no masks ({DAVIS_MASKS}/<sequence>/) for {', '.join(unmasked)}")
    return scored


def source_names(source: Input) -> set[str]:
    """The names of the videos an input trains on, as pack.py's video ids write them."""
    if source.kind == "davis":
        return {sanitize_key(n) for n in source.sequences}
    if source.kind == "video":
        return {sanitize_key(source.path.stem)}
    if source.kind == "videos":
        return {sanitize_key(Path(s.rel).stem) for s in find_videos(source.path)[0]}
    manifest = load_manifest(source.path)     # keys are <dataset>_<video id>_<segment:05d>
    prefix = sanitize_key(manifest["name"], 24) + "_"
    return {key[len(prefix):-6] for idx in manifest["idx_paths"] for key, _ in read_index(idx)}


def check_no_overlap(train: list[Input], scored: Input) -> None:
    """Refuse scoring a sequence that is also trained on."""
    for source in train:
        both = sorted(n for n in scored.sequences if sanitize_key(n) in source_names(source))
        if both:
            raise InputError(f"--eval-data sequence(s) {', '.join(both)} also in --train-data {source.path}: "
                             "score sequences that are not trained on (choose them with PATH:NAME,...)")


def pack(source: Input, out: Path, data: RealData) -> Path:
    """Pack one unpacked input into its own dataset folder under `out` (reused when complete)."""
    settings = f"{source.path.resolve()}|{','.join(source.sequences)}|{data}"
    name = sanitize_key(f"{source.path.stem}-{short_hash(settings)}", 24)
    dataset = out / name
    argv = ["--kind", "frames" if source.kind == "davis" else "videos", "--out", str(dataset), "--name", name,
            "--fps", f"{data.fps:g}", "--short-side", str(data.short_side), "--clip-seconds", f"{data.clip_seconds:g}",
            "--quiet"]
    if source.kind == "davis":   # the frame folders alone: no Annotations beside them, so no masks are packed
        subset = out / f"{name}.txt"
        subset.write_text("".join(f"{n}\n" for n in source.sequences))
        argv += ["--src", str(source.path / DAVIS_FRAMES), "--subset", str(subset)]
    elif source.kind == "video":  # pack.py reads folders: a folder holding a link to the file
        folder = out / f"{name}-src"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / source.path.name
        if not link.is_symlink():
            link.symlink_to(source.path.resolve())
        argv += ["--src", str(folder)]
    else:
        argv += ["--src", str(source.path)]
    command = [sys.executable, str(REPO_ROOT / "shard_tools" / "pack.py"), *argv]
    print("$ " + " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise InputError(f"--train-data {source}: pack.py packed nothing (see {dataset / MANIFEST})")
    return dataset


def combine(datasets: list[Path], out: Path) -> Path:
    """One dataset folder whose manifest lists the shards of `datasets` (by relative path, not copied)."""
    manifests = [load_manifest(d) for d in datasets]
    formats = {"jpeg" if m.get("format", "jpeg") == "original" else m["format"] for m in manifests}
    if len(formats) > 1:
        raise InputError(f"--train-data: packed datasets of different formats ({', '.join(sorted(formats))}) "
                         "cannot be trained on together; repack them with one --format")
    out.mkdir(parents=True, exist_ok=True)
    shards = [{**shard, "tar": os.path.relpath(d / shard["tar"], out), "idx": os.path.relpath(d / shard["idx"], out)}
              for d, m in zip(datasets, manifests) for shard in m["shards"]]
    write_manifest(out, {"name": out.name, "kind": "combined", "format": formats.pop(),
                         "parts": [os.path.relpath(d, out) for d in datasets], "shards": shards,
                         "samples": sum(m["samples"] for m in manifests),
                         "frames": sum(m["frames"] for m in manifests), "classes": None, "skipped": [],
                         "complete": True})
    return out


def link_sequences(scored: Input, out: Path) -> Path:
    """A DAVIS-layout folder at `out` of links to the scored sequences (made anew each run)."""
    if out.exists():
        shutil.rmtree(out)   # links and a list only: the linked sequences are not touched
    for sub in (DAVIS_FRAMES, DAVIS_MASKS):
        (out / sub).mkdir(parents=True)
        for name in scored.sequences:
            (out / sub / name).symlink_to((scored.path / sub / name).resolve(), target_is_directory=True)
    (out / "ImageSets" / "2017").mkdir(parents=True)
    (out / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{n}\n" for n in scored.sequences))
    return out


def prepare_real_data(train: list[Input], scored: Input, out: Path, data: RealData) -> tuple[Path, Path]:
    """Pack what is not packed, combine it into DIR/data/shards/train, link the scored sequences."""
    parts = [s.path if s.kind == "shards" else pack(s, out / "data" / "shards" / "parts", data) for s in train]
    shards = combine(parts, out / "data" / "shards" / "train")
    davis = link_sequences(scored, out / "data" / "eval" / "davis")
    manifest = json.loads((shards / MANIFEST).read_text())
    print(f"data: {manifest['samples']} training samples ({manifest['frames']} frames) from "
          f"{len(train)} input(s) in {shards}, {len(scored.sequences)} scored sequences in {davis}", flush=True)
    return shards, davis
