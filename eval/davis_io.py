"""DAVIS-layout folders and palette PNGs: the one place eval reads and writes frames and masks.

Layout (as the DAVIS-2017 toolkit expects it)::

    <root>/JPEGImages/480p/<sequence>/00000.jpg ...
    <root>/Annotations/480p/<sequence>/00000.png ...            (semi-supervised task)
    <root>/Annotations_unsupervised/480p/<sequence>/00000.png   (unsupervised task)
    <root>/ImageSets/2017/<subset>.txt                          (one sequence name per line)

Masks are single-channel index images: 0 = background, k = object k, 255 = void. The colours are the
PASCAL-VOC colour map, generated here (never downloaded) so that our PNGs look like the toolkit's.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

VOID_LABEL = 255


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """PASCAL-VOC colour map, (num_colors, 3) uint8: the bits of index i are spread, three at a time,
    over the most significant bits of R, G and B (0 black, 1 (128,0,0), 2 (0,128,0), 3 (128,128,0) ...)."""
    index = np.arange(num_colors)
    palette = np.zeros((num_colors, 3), dtype=np.int64)
    for round_ in range(8):
        for channel in range(3):
            bit = (index >> (3 * round_ + channel)) & 1
            palette[:, channel] |= bit << (7 - round_)
    return palette.astype(np.uint8)


def read_mask(path: str | Path | io.BytesIO) -> np.ndarray:
    """Read an index PNG ("P" or "L" mode) as an (H, W) uint8 label map."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: mask PNG has mode {image.mode!r}; DAVIS masks must be single-channel index "
                "images (palette 'P' or grayscale 'L') whose values are object ids. Convert colour "
                "masks to ids first.")
        return np.array(image)


def write_mask(path: str | Path, labels: np.ndarray) -> None:
    """Write an (H, W) label map as a palette PNG with the VOC colour map."""
    if labels.ndim != 2:
        raise ValueError(f"{path}: a mask must be 2-D (H, W), got shape {labels.shape}")
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError(f"{path}: mask ids must lie in 0..255, got {labels.min()}..{labels.max()}")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(voc_palette().ravel().tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def read_frame(path: str | Path | io.BytesIO) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


@dataclass(frozen=True)
class Sequence:
    """One video: its frames (paths or in-memory bytes, in order) and its annotated masks by frame stem."""

    name: str
    frames: tuple          # of Path or bytes
    frame_stems: tuple[str, ...]
    masks: dict            # frame stem -> Path or bytes

    def frame(self, index: int) -> np.ndarray:
        source = self.frames[index]
        return read_frame(io.BytesIO(source) if isinstance(source, bytes) else source)

    def mask(self, stem: str) -> np.ndarray:
        source = self.masks[stem]
        return read_mask(io.BytesIO(source) if isinstance(source, bytes) else source)


class DavisFolder:
    """Reader for a DAVIS-layout folder (see the module docstring)."""

    def __init__(self, root: str | Path, subset: str = "val", resolution: str = "480p",
                 task: str = "semi-supervised"):
        self.root = Path(root)
        self.frames_dir = self.root / "JPEGImages" / resolution
        masks_folder = "Annotations" if task == "semi-supervised" else "Annotations_unsupervised"
        self.masks_dir = self.root / masks_folder / resolution
        if not self.frames_dir.is_dir():
            raise FileNotFoundError(
                f"{self.frames_dir} does not exist: --data must be a DAVIS-layout folder "
                f"(JPEGImages/{resolution}/<sequence>/*.jpg and {masks_folder}/{resolution}/<sequence>/*.png) "
                "or evaluation shards from `shard_tools/pack.py --kind frames`")
        if not self.masks_dir.is_dir():
            raise FileNotFoundError(f"{self.masks_dir} does not exist: the {task} task needs its masks there")
        subset_file = self.root / "ImageSets" / "2017" / f"{subset}.txt"
        if subset_file.is_file():
            names = [line.strip() for line in subset_file.read_text().splitlines() if line.strip()]
        else:  # a user's own folder without ImageSets: every sequence that has masks
            names = sorted(p.name for p in self.masks_dir.iterdir() if p.is_dir())
        if not names:
            raise FileNotFoundError(f"{self.root}: no sequences found (looked at {subset_file} and {self.masks_dir})")
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Sequence]:
        return (self.sequence(name) for name in self.names)

    def sequence(self, name: str) -> Sequence:
        frames = sorted((self.frames_dir / name).glob("*.jpg"))
        if not frames:
            raise FileNotFoundError(f"{self.frames_dir / name}: no .jpg frames for sequence {name!r}")
        masks = {p.stem: p for p in sorted((self.masks_dir / name).glob("*.png"))}
        if not masks:
            raise FileNotFoundError(f"{self.masks_dir / name}: no .png masks for sequence {name!r}")
        return Sequence(name, tuple(frames), tuple(p.stem for p in frames), masks)


def read_eval_shards(dataset_dir: str | Path) -> Iterator[Sequence]:
    """Evaluation samples from shards written by ``shard_tools/pack.py`` (design.md §1): the original
    JPEG and palette-PNG bytes, with the original file names from the sample's ``json``."""
    from shard_tools.reader import iter_samples, sample_meta

    for tar_path, key, members in iter_samples(dataset_dir):
        meta, _ = sample_meta(members)
        if not meta.get("eval"):
            raise ValueError(f"{tar_path}: sample {key} is not an evaluation sample (its json 'eval' is false); "
                             "pack the DAVIS folder with --kind frames so that Annotations/ is kept")
        frames = tuple(members[f"f{i:03d}.jpg"] for i in range(len(meta["frames"])))
        stems = tuple(Path(name).stem for name in meta["frames"])
        position = {stem: i for i, stem in enumerate(stems)}  # mNNN.png is numbered by its frame
        masks = {Path(name).stem: members[f"m{position[Path(name).stem]:03d}.png"] for name in meta["masks"]}
        yield Sequence(meta.get("video_id") or key, frames, stems, masks)


def open_sequences(path: str | Path, subset: str = "val", task: str = "semi-supervised") -> list[Sequence]:
    """A DAVIS-layout folder or an evaluation-shard folder (recognised by its manifest.json)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return list(read_eval_shards(path))
    return list(DavisFolder(path, subset=subset, task=task))


def write_davis_folder(root: str | Path, sequences: dict[str, tuple[list[np.ndarray], list[np.ndarray]]],
                       subset: str = "val", resolution: str = "480p") -> Path:
    """Write ``{name: (frames RGB uint8, masks uint8)}`` as a DAVIS-layout folder (JPEG quality 95)."""
    root = Path(root)
    for name, (frames, masks) in sequences.items():
        frame_dir = root / "JPEGImages" / resolution / name
        frame_dir.mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(frames):
            Image.fromarray(frame).save(frame_dir / f"{index:05d}.jpg", quality=95)
        for index, mask in enumerate(masks):
            write_mask(root / "Annotations" / resolution / name / f"{index:05d}.png", mask)
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{subset}.txt").write_text("".join(f"{name}\n" for name in sequences))
    return root
