"""Pictures are uint8 arrays of the right shape with the right colours."""
import numpy as np
import torch
from PIL import Image

from eval import visualize as vis
from eval.davis_io import voc_palette


def test_voc_palette_first_entries():
    palette = voc_palette()
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[255].tolist() == [224, 224, 192]


def test_overlay_colours_objects_and_keeps_background():
    frame = np.full((20, 30, 3), 100, np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:15] = 1
    out = vis.overlay(frame, mask, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == frame.shape
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[8, 8].tolist() == [114, 50, 50]    # inside: halfway to (128, 0, 0)
    assert out[14, 8].tolist() == [128, 0, 0]     # boundary row drawn opaque


def test_strip_and_gif(tmp_path):
    frames = [np.full((40, 60, 3), 10 * t, np.uint8) for t in range(5)]
    masks = [np.zeros((40, 60), np.uint8) for _ in range(5)]
    strip = vis.overlay_strip(frames, masks, count=3, height=20)
    assert strip.shape == (20, 90, 3)
    path = vis.save_gif(tmp_path / "a.gif", frames, masks, fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == 5


def test_pca_rgb_maps_first_component_to_red():
    h, w = 4, 6
    ramp = torch.linspace(-1, 1, w).expand(h, w)
    features = torch.stack([ramp * 10, torch.randn(h, w) * 0.01, torch.randn(h, w) * 0.01, torch.zeros(h, w)])
    rgb = vis.pca_rgb(features)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    red = rgb[0, :, 0].astype(int)
    assert abs(red[-1] - red[0]) == 255 and (np.diff(red) * np.sign(red[-1] - red[0]) >= 0).all()
    assert vis.pca_rgb(torch.stack([features, features]), size=(8, 12)).shape == (2, 8, 12, 3)


def test_attention_maps_per_head():
    import models

    vit = models.build("vit_tiny_patch16").eval()
    image = torch.randn(3, 32, 48)
    maps = vis.attention_maps(vit, image)
    assert maps.shape == (vit.num_heads, 2, 3) and maps.dtype == np.uint8
    assert (maps.max(axis=(1, 2)) == 255).all()
    assert vis.attention_grid(maps, scale=4).shape == (8, vit.num_heads * 12, 3)
