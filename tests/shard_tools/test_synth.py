import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from shard_tools.synth import make_dataset, render_video, voc_palette


def test_voc_palette_matches_davis_colours():
    palette = voc_palette()
    assert palette.shape == (256, 3)
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[255].tolist() == [224, 224, 192]


def test_dataset_layout_and_determinism(tmp_path):
    kwargs = dict(videos=2, classes=2, davis=1, frames=6, width=48, height=32)
    a = make_dataset(tmp_path / "a", seed=3, **kwargs)
    b = make_dataset(tmp_path / "b", seed=3, **kwargs)
    c = make_dataset(tmp_path / "c", seed=4, **kwargs)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(
        ["videos/stripes/stripes_000.mp4", "videos/checker/checker_001.mp4", "davis/ImageSets/2017/val.txt"]
        + [f"davis/JPEGImages/480p/synth00/{t:05d}.jpg" for t in range(6)]
        + [f"davis/Annotations/480p/synth00/{t:05d}.png" for t in range(6)])
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / files[-1]).read_bytes() != (c / files[-1]).read_bytes()
    mask = Image.open(a / "davis/Annotations/480p/synth00/00000.png")
    assert mask.mode == "P" and mask.size == (48, 32)


def test_masks_are_exact_and_objects_enter_leave_and_occlude():
    video, masks = render_video(seed=0, frames=32, width=128, height=96, objects=3, object_texture="dots")
    assert video.shape == (32, 96, 128, 3) and masks.shape == (32, 96, 128)
    assert set(np.unique(masks[0])) == {0, 1, 2, 3}
    area = np.stack([(masks == k).sum((1, 2)) for k in (1, 2, 3)])      # (objects, frames)
    assert area[0, 0] < 0.5 * area[0, 10]                                 # object 1 enters
    assert area[2, -1] == 0 and area[2, 0] > 0                           # object 3 leaves
    # occlusion: somewhere an object covers part of another (visible area drops below its usual size)
    assert (area[:2, :20].min(1) < 0.85 * np.median(area[:2, :20], 1)).any()


def _propagation_j(video, masks, t, radius):
    """Mean J of 1-nearest-neighbour label propagation from frame 0 to frame t with features that
    are RGB patches of the given radius (0: the pixel colour alone), on a stride-2 grid."""
    def features(image):
        x = np.pad(image.astype(np.float64) / 255, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
        w = sliding_window_view(x, (2 * radius + 1, 2 * radius + 1), axis=(0, 1))[::2, ::2]
        return w.reshape(w.shape[0] * w.shape[1], -1)
    a, b = features(video[0]), features(video[t])
    dist = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None]
    pred, truth = masks[0][::2, ::2].reshape(-1)[dist.argmin(1)], masks[t][::2, ::2].reshape(-1)
    return np.mean([((pred == k) & (truth == k)).sum() / ((pred == k) | (truth == k)).sum()
                    for k in np.unique(truth) if k])


def test_raw_colour_propagation_is_poor_and_texture_helps():
    pixel, patch = [], []
    for seed in range(3):
        video, masks = render_video(seed, frames=12, width=128, height=96, objects=3, object_texture="checker")
        pixel.append(_propagation_j(video, masks, 8, radius=0))
        patch.append(_propagation_j(video, masks, 8, radius=2))
    assert np.mean(pixel) < 0.3
    assert np.mean(patch) > np.mean(pixel) + 0.15
