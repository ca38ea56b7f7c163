"""The embedded synthetic dataset: textured objects moving over textured, moving backgrounds.

    python shard_tools/synth.py --out DIR [--videos 6 --classes 3 --davis 2 --frames 32 ...]

writes
    DIR/videos/<class>/<class>_<i>.mp4            raw training videos (H.264), one folder per class
    DIR/davis/JPEGImages/480p/<seq>/00000.jpg     a DAVIS-layout evaluation set with exact
    DIR/davis/Annotations/480p/<seq>/00000.png    per-frame instance masks (VOC-palette PNGs)
    DIR/davis/ImageSets/2017/val.txt

Objects and background are painted from the same few colours and differ only by texture (grating,
checkerboard, dots, smooth blobs), the lighting drifts over time and every frame has sensor noise,
so propagating labels by raw pixel colour is clearly imperfect and learned features can show a gain.
Objects translate, scale, occlude one another and enter or leave the frame. A video's class is its
objects' texture family, so a classifier on good features can recover it. Output depends only on
the arguments (`--seed` included).
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from shard_tools.encode import EncodeSettings, SegmentEncoder  # noqa: E402

TEXTURES = ("stripes", "checker", "dots", "blobs")


def voc_palette() -> np.ndarray:
    """The PASCAL-VOC / DAVIS colour map as a (256, 3) uint8 array (index bits spread over RGB MSBs)."""
    index = np.arange(256)
    palette = np.zeros((256, 3), np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (index >> (3 * shift + channel)) & 1
            palette[:, channel] |= bit << (7 - shift)
    return palette.astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid bilinearly upsampled to (h, w)."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.random((gh, gw))
    y = np.arange(h) / cell
    x = np.arange(w) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def texture(rng: np.random.Generator, kind: str, h: int, w: int, colours: np.ndarray) -> np.ndarray:
    """An (h, w, 3) float texture in [0, 1] mixing two of `colours` by a pattern of type `kind`."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 9)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == "checker":
        cell = rng.integers(4, 7)
        pattern = ((xx // cell + yy // cell) % 2).astype(np.float64)
    elif kind == "dots":
        period = rng.uniform(6, 9)
        pattern = ((np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)) > 0.3).astype(np.float64)
    else:
        pattern = _smooth_noise(rng, h, w, int(rng.integers(6, 12)))
    pair = colours[rng.choice(len(colours), 2, replace=False)]
    return pair[0] * pattern[..., None] + pair[1] * (1 - pattern[..., None])


@dataclass
class _Object:
    tex: np.ndarray                 # (S, S, 3) texture
    shape: np.ndarray               # (S, S) bool silhouette
    start: np.ndarray               # centre at t = 0 (x, y), pixels
    velocity: np.ndarray            # pixels per frame
    wobble: np.ndarray              # sinusoidal amplitude (x, y)
    scale0: float
    scale_rate: float               # relative scale change per frame


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random star-convex silhouette filling most of a size×size square."""
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    radius = np.hypot(xx, yy) / (size / 2)
    angle = np.arctan2(yy, xx)
    harmonics = rng.normal(0, 0.12, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    limit = 0.8 + sum(a * np.cos((k + 2) * angle + p) for k, (a, p) in enumerate(zip(harmonics, phases)))
    return radius < np.clip(limit, 0.4, 0.98)


def render_video(seed: int, frames: int, width: int, height: int, objects: int,
                 object_texture: str, noise: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """Render one video: (T, H, W, 3) uint8 frames and (T, H, W) uint8 instance masks (0 = background).

    Objects are painted in order, so a later object occludes an earlier one; the first object
    enters from outside the frame and the last one leaves it. `noise` is the standard deviation of
    the per-pixel sensor noise (intensities in [0, 1]).
    """
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.15, 0.85, (3, 3))            # shared by background and objects
    bg_kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    pad = frames * 2 + 8
    background = texture(rng, bg_kind, height + 2 * pad, width + 2 * pad, colours)
    bg_velocity = rng.uniform(-1.5, 1.5, 2)

    size = max(8, int(min(width, height) * 0.45))
    objs = []
    for k in range(objects):
        start = rng.uniform([0.2 * width, 0.2 * height], [0.8 * width, 0.8 * height])
        velocity = rng.uniform(-0.5, 0.5, 2) * min(width, height) / frames
        if k == 0:                                        # enters from the left
            start[0], velocity[0] = -0.3 * size, 0.7 * width / frames
        elif k == objects - 1 and objects > 1:            # leaves through the right edge
            velocity[0] = (width + 0.6 * size - start[0]) / (0.85 * frames)
        objs.append(_Object(texture(rng, object_texture, size, size, colours), _blob(rng, size), start,
                            velocity, rng.uniform(0, 0.08, 2) * min(width, height),
                            rng.uniform(0.6, 1.0), rng.uniform(-0.4, 0.4) / frames))

    video = np.empty((frames, height, width, 3), np.uint8)
    masks = np.zeros((frames, height, width), np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    lighting_phase = rng.uniform(0, 2 * np.pi)
    for t in range(frames):
        oy, ox = (pad + bg_velocity[::-1] * t).astype(int)
        canvas = background[oy:oy + height, ox:ox + width].copy()
        label = np.zeros((height, width), np.uint8)
        for k, obj in enumerate(objs, start=1):
            centre = obj.start + obj.velocity * t + obj.wobble * np.sin(0.3 * t + k)
            scale = obj.scale0 * (1 + obj.scale_rate * t)
            # Inverse-map every pixel into the object's texture square (nearest neighbour).
            u = np.floor((xx - centre[0]) / scale + size / 2).astype(int)
            v = np.floor((yy - centre[1]) / scale + size / 2).astype(int)
            inside = (u >= 0) & (u < size) & (v >= 0) & (v < size)
            inside[inside] = obj.shape[v[inside], u[inside]]
            canvas[inside] = obj.tex[v[inside], u[inside]]
            label[inside] = k
        gain = 1 + 0.18 * np.sin(2 * np.pi * t / max(frames, 1) + lighting_phase)
        tint = 1 + 0.05 * np.sin(2 * np.pi * t / max(frames, 1) + lighting_phase + np.array([0, 2, 4]))
        canvas = canvas * gain * tint + rng.normal(0, noise, canvas.shape)
        video[t] = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
        masks[t] = label
    return video, masks


def write_mp4(path: Path, video: np.ndarray, fps: float, crf: int = 16) -> None:
    """Encode (T, H, W, 3) frames as an H.264 mp4 (the 'raw' input of the pack tests)."""
    encoder = SegmentEncoder(EncodeSettings(format="h264", fps=fps, crf=crf, gop=12, preset="fast"))
    for frame in video:
        encoder.add(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoder.finish()["mp4"])


def write_davis_sequence(root: Path, name: str, video: np.ndarray, masks: np.ndarray) -> None:
    """Write one sequence in DAVIS layout: JPEG frames and palette-PNG masks, 00000.jpg/.png …"""
    jpg_dir = root / "JPEGImages" / "480p" / name
    png_dir = root / "Annotations" / "480p" / name
    jpg_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    palette = voc_palette().flatten().tolist()
    for t, (frame, mask) in enumerate(zip(video, masks)):
        Image.fromarray(frame).save(jpg_dir / f"{t:05d}.jpg", quality=95)
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(png_dir / f"{t:05d}.png")


def make_dataset(out: str | os.PathLike, seed: int = 0, videos: int = 6, classes: int = 3, davis: int = 2,
                 frames: int = 32, width: int = 128, height: int = 96, objects: int = 3,
                 fps: float = 25.0) -> Path:
    """Write the synthetic dataset under `out` (see the module docstring) and return `out`."""
    if not 1 <= classes <= len(TEXTURES):
        raise ValueError(f"--classes must be between 1 and {len(TEXTURES)}, got {classes}")
    out = Path(out)
    for i in range(videos):
        cls = TEXTURES[i % classes]
        video, _ = render_video(seed * 100_003 + i, frames, width, height, objects, cls)
        write_mp4(out / "videos" / cls / f"{cls}_{i:03d}.mp4", video, fps)
    names = []
    for j in range(davis):
        name = f"synth{j:02d}"
        video, masks = render_video(seed * 100_003 + 50_000 + j, frames, width, height, objects,
                                    TEXTURES[j % len(TEXTURES)])
        write_davis_sequence(out / "davis", name, video, masks)
        names.append(name)
    image_sets = out / "davis" / "ImageSets" / "2017"
    image_sets.mkdir(parents=True, exist_ok=True)
    (image_sets / "val.txt").write_text("".join(n + "\n" for n in names))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the output depends only on the arguments")
    parser.add_argument("--videos", type=int, default=6, help="number of raw training videos")
    parser.add_argument("--classes", type=int, default=3, help=f"number of classes (1-{len(TEXTURES)})")
    parser.add_argument("--davis", type=int, default=2, help="number of DAVIS-layout evaluation sequences")
    parser.add_argument("--frames", type=int, default=32, help="frames per video / sequence")
    parser.add_argument("--width", type=int, default=128, help="frame width in pixels")
    parser.add_argument("--height", type=int, default=96, help="frame height in pixels")
    parser.add_argument("--objects", type=int, default=3, help="moving objects per video")
    parser.add_argument("--fps", type=float, default=25.0, help="frame rate of the raw videos")
    args = parser.parse_args(argv)
    out = make_dataset(args.out, seed=args.seed, videos=args.videos, classes=args.classes, davis=args.davis,
                       frames=args.frames, width=args.width, height=args.height, objects=args.objects,
                       fps=args.fps)
    print(f"wrote {args.videos} videos and {args.davis} DAVIS sequences to {out}")


if __name__ == "__main__":
    main()
