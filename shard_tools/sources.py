"""Inputs of pack.py: find the sources under `--src` and turn one source into its samples.

A source is a video file (`--kind videos|long`) or a frame folder (`--kind frames`). Finding them
never opens a file; turning a source into samples (`video_segments`, `frame_folder_segments`,
`eval_sample`) raises `BadInput` with the reason when the source cannot be packed.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .encode import (MAX_FRAMES_PER_SAMPLE, BadInput, EncodeSettings, SegmentEncoder, iter_video_frames,
                     probe_video, resize_rgb)
from .keys import unique_video_ids

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".ogv", ".3gp", ".ts", ".mts", ".m2ts", ".gif"}
FRAME_EXTENSIONS = {".jpg", ".jpeg"}
_DIGITS = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class Source:
    """One input: `rel` is its path relative to `--src` (a file, or a frame folder)."""
    rel: str
    video_id: str
    label: str | None = None
    masks_rel: str | None = None      # frame folders: the matching Annotations folder, if any


@dataclass
class Segment:
    """One sample's payload: encoded members, frame count, frame size, where it starts in the source."""
    index: int
    start_frame: int
    nframes: int
    members: dict[str, bytes]
    width: int
    height: int

    @classmethod
    def from_encoder(cls, index: int, start_frame: int, encoder: SegmentEncoder) -> "Segment":
        return cls(index, start_frame, encoder.nframes, encoder.finish(), *encoder.size)


def _skip(path: str, reason: str) -> dict:
    return {"path": path, "reason": reason}


def _walk_files(root: Path) -> list[str]:
    """Regular, non-hidden files under `root`, as sorted relative posix paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def read_labels_csv(path: str | os.PathLike) -> dict[str, str]:
    """`path,label` rows (an optional header row `path,label` is skipped) -> {relative path: label}."""
    labels: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or (lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path}:{lineno}: expected `path,label`, got {row!r}")
            labels[Path(row[0].strip()).as_posix()] = row[1].strip()
    return labels


def find_videos(src: Path, labels_csv: str | None = None) -> tuple[list[Source], list[dict]]:
    """Video files under `src` and what was passed over.

    Labels come from `labels_csv` when given (videos it does not list are skipped, and listed paths
    that do not exist are reported); otherwise from the first folder level (`src/<class>/…`), and
    videos directly in `src` are unlabelled.
    """
    skipped: list[dict] = []
    videos: list[str] = []
    for rel in _walk_files(src):
        if Path(rel).suffix.lower() in VIDEO_EXTENSIONS:
            videos.append(rel)
        else:
            skipped.append(_skip(rel, f"not a video file extension ({Path(rel).suffix or 'none'}); "
                                      f"known: {' '.join(sorted(VIDEO_EXTENSIONS))}"))
    if labels_csv is not None:
        table = read_labels_csv(labels_csv)
        present = set(videos)
        skipped += [_skip(rel, f"listed in {labels_csv} but not found under {src}")
                    for rel in sorted(set(table) - present)]
        skipped += [_skip(rel, f"no label: not listed in {labels_csv}") for rel in videos if rel not in table]
        videos = [rel for rel in videos if rel in table]
        label_of = table.get
    else:
        label_of = lambda rel: rel.split("/")[0] if "/" in rel else None  # noqa: E731
    ids = unique_video_ids(videos)
    return [Source(rel, ids[rel], label_of(rel)) for rel in videos], skipped


def _frames_roots(src: Path) -> tuple[Path, Path | None]:
    """(frame root, annotation root or None): DAVIS `JPEGImages/480p`, `JPEGImages/`, or `src` itself."""
    for sub in ("480p", ""):
        jpegs = src / "JPEGImages" / sub
        if jpegs.is_dir() and (sub or not (src / "JPEGImages" / "480p").is_dir()):
            masks = src / "Annotations" / sub
            return jpegs, masks if masks.is_dir() else None
    return src, None


def find_frame_folders(src: Path, subset: list[str] | None = None) -> tuple[list[Source], list[dict]]:
    """Frame folders (`JPEGImages[/480p]/<video>/`, else `src/<video>/`), with their mask folders.

    `subset` (e.g. the lines of DAVIS `ImageSets/2017/val.txt`) keeps only the folders it names;
    a name with no folder is reported as skipped.
    """
    frame_root, mask_root = _frames_roots(src)
    names = sorted(p.name for p in frame_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    skipped = []
    if subset is not None:
        wanted = set(subset)
        skipped = [_skip((frame_root / n).relative_to(src).as_posix(), "listed in --subset but no such folder")
                   for n in sorted(wanted - set(names))]
        names = [n for n in names if n in wanted]
    ids = unique_video_ids(names)
    sources = []
    for name in names:
        rel = (frame_root / name).relative_to(src).as_posix()
        masks = mask_root / name if mask_root is not None else None
        if mask_root is not None and not masks.is_dir():
            skipped.append(_skip(rel, f"no mask folder {masks.relative_to(src).as_posix()} although "
                                      f"{mask_root.relative_to(src).as_posix()} exists"))
            continue
        sources.append(Source(rel, ids[name], None, masks.relative_to(src).as_posix() if masks else None))
    return sources, skipped


def segment_frames(frames: Iterator[np.ndarray], settings: EncodeSettings, clip_frames: int | None,
                   stats: dict) -> Iterator[Segment]:
    """Group a stream of RGB frames into samples of `clip_frames` frames, encoding as they arrive.

    With `clip_frames`, a shorter tail is dropped and counted in `stats["tail_frames_dropped"]`
    unless it is the whole source (a source shorter than one clip becomes one shorter sample).
    Without it the whole source is one sample (JPEG samples split every 1000 frames, tail kept).
    """
    limit = clip_frames or (MAX_FRAMES_PER_SAMPLE if settings.format == "jpeg" else None)
    encoder, index, start = SegmentEncoder(settings), 0, 0
    for frame in frames:
        encoder.add(frame)
        if limit is not None and encoder.nframes == limit:
            yield Segment.from_encoder(index, start, encoder)
            index, start, encoder = index + 1, start + limit, SegmentEncoder(settings)
    if encoder.nframes:
        if clip_frames and index > 0:
            stats["tail_frames_dropped"] = encoder.nframes
        else:
            yield Segment.from_encoder(index, start, encoder)


def video_segments(path: str, settings: EncodeSettings, clip_frames: int | None,
                   stats: dict, decode_threads: int = 0) -> Iterator[Segment]:
    """Decode a video file once, sequentially, at constant fps, and encode it into segments.

    Raises BadInput when the file cannot be opened or decoded, or ends more than a second (and
    10 %) before its container says it does (a truncated file); segments already yielded are
    complete and valid. `stats["source_info"]` gets what probing found (fps, size, rotation, codec).
    """
    info = probe_video(path)
    stats["source_info"] = {"fps": round(info.fps, 6), "width": info.width, "height": info.height,
                            "rotation": info.rotation, "codec": info.codec, "duration": round(info.duration, 6)}
    frames = iter_video_frames(path, settings.fps, settings.short_side, info, stats, decode_threads)
    segments = segment_frames(frames, settings, clip_frames, stats)
    pending = next(segments, None)
    for segment in segments:
        yield pending
        pending = segment
    decoded = stats.get("decoded_seconds", 0.0)
    if np.isfinite(info.duration) and decoded < info.duration - max(1.0, 0.1 * info.duration):
        raise BadInput(f"truncated: decoded {decoded:.2f} s of the {info.duration:.2f} s the container declares")
    if pending is not None:
        yield pending


def list_frames(folder: Path) -> list[Path]:
    """The JPEG frames of a folder in order; BadInput if there are none or their numbering has gaps."""
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and not p.name.startswith("."))
    if not frames:
        raise BadInput(f"no JPEG frames in {folder}")
    numbers = [_DIGITS.search(p.stem) for p in frames]
    if all(numbers):
        values = sorted(int(m.group(1)) for m in numbers)
        steps = np.diff(values)
        if len(steps) and (steps.min() <= 0 or steps.max() != steps.min()):
            at = int(np.argmax(steps != np.bincount(steps).argmax()))
            raise BadInput(f"missing frames: numbering jumps from {values[at]} to {values[at + 1]} "
                           f"(step {np.bincount(steps).argmax()} elsewhere)")
        frames = [p for _, p in sorted(zip((int(m.group(1)) for m in numbers), frames))]
    return frames


def frame_folder_segments(folder: Path, settings: EncodeSettings, clip_frames: int | None,
                          stats: dict) -> Iterator[Segment]:
    """Re-encode a frame folder (each JPEG one frame at the declared `--fps`) into segments.
    `stats["source_info"]` gets the frames' size."""
    paths = list_frames(folder)

    def frames() -> Iterator[np.ndarray]:
        first = None
        for p in paths:
            image = _load_image(p.read_bytes(), p)
            if first is None:
                first = image.size
                stats["source_info"] = {"width": first[0], "height": first[1]}
            if image.size != first:
                raise BadInput(f"frame {p.name} is {image.size[0]}x{image.size[1]}, the first is {first[0]}x{first[1]}")
            yield resize_rgb(image, settings.short_side)

    yield from segment_frames(frames(), settings, clip_frames, stats)


def eval_sample(folder: Path, mask_folder: Path) -> tuple[Segment, dict]:
    """An evaluation sample: the original JPEG and palette-PNG bytes, untouched.

    Member `fNNN.jpg` is the N-th frame, `mNNN.png` the mask of that same frame (only frames with
    a mask have one). Returns the segment and the extra json fields (`frames`, `masks`).
    Every image is decoded once to check it, and masks must be single-channel and frame-sized.
    """
    paths = list_frames(folder)
    if len(paths) > MAX_FRAMES_PER_SAMPLE:
        raise BadInput(f"{len(paths)} frames; an evaluation sample holds at most {MAX_FRAMES_PER_SAMPLE}")
    position = {p.stem: i for i, p in enumerate(paths)}
    members: dict[str, bytes] = {}
    size = None
    for i, p in enumerate(paths):
        data = p.read_bytes()
        image = _load_image(data, p)
        if size is None:
            size = image.size
        elif image.size != size:
            raise BadInput(f"frame {p.name} is {image.size[0]}x{image.size[1]}, the first is {size[0]}x{size[1]}")
        members[f"f{i:03d}.jpg"] = data
    masks = sorted(p for p in mask_folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
    mask_names = []
    for m in masks:
        if m.stem not in position:
            raise BadInput(f"mask {m.name} has no frame {m.stem}.jpg")
        data = m.read_bytes()
        image = _load_image(data, m)
        if image.mode not in ("P", "L"):
            raise BadInput(f"mask {m.name} is mode {image.mode}; expected a palette (P) or grey (L) PNG")
        if image.size != size:
            raise BadInput(f"mask {m.name} is {image.size[0]}x{image.size[1]}, frames are {size[0]}x{size[1]}")
        members[f"m{position[m.stem]:03d}.png"] = data
        mask_names.append(m.name)
    return Segment(0, 0, len(paths), members, *size), {"frames": [p.name for p in paths], "masks": mask_names}


def _load_image(data: bytes, path: Path) -> Image.Image:
    """Decode image bytes fully (so corrupt or truncated files are caught); BadInput names the file."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadInput(f"unreadable image {path.name}: {err}") from None
    return image
