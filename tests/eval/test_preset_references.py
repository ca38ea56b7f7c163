"""Each label-propagation preset's preprocessing against a transcription of its reference script.

The reference scripts cannot run in CI (no network, no copies of their code), so each step is written
again here as the script does it (function and line named in each test, commits as in the team's
evaluation notes: facebookresearch/dino 7c446df, ajabri/videowalk 047f3f4, shvdiwnkozbw/SMTC 4a31e5c) and
compared with ours on a real-looking 854x480 frame: smooth shading, edges, texture and sensor noise.
tests/eval/test_reference_masks.py compares whole runs with masks the scripts themselves wrote.
"""
import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models
from eval.features import dense_features, pads_to_cover_frame
from eval.label_prop import first_frame_labels, network_input, network_size, soft_to_mask
from eval.propagation_config import PRESETS

HEIGHT, WIDTH = 480, 854
IMAGENET_MEAN = [0.485, 0.456, 0.406]


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A real-looking RGB uint8 frame: shaded background, a few objects with hard edges, fine texture, noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] / np.array([HEIGHT, WIDTH])[:, None, None]
    image = np.stack([90 + 80 * yy, 110 + 60 * xx, 140 - 50 * yy * xx], axis=-1)
    for _ in range(12):
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.2)
        inside = (yy - cy) ** 2 + ((xx - cx) * WIDTH / HEIGHT) ** 2 < radius ** 2
        image[inside] = rng.uniform(0, 255, 3)
    image += 25 * np.sin(xx[..., None] * 311 + yy[..., None] * 97)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    """Two objects and one too small to survive DINO's 16x label resize."""
    ids = np.zeros((HEIGHT, WIDTH), np.uint8)
    ids[100:300, 200:520] = 1
    ids[250:420, 600:800] = 2
    ids[26:30, 26:30] = 3
    return ids


def color_normalize(x: torch.Tensor, std) -> torch.Tensor:
    """Both scripts' color_normalize: per channel, in place, float32."""
    for t, m, s in zip(x, IMAGENET_MEAN, std):
        t.sub_(m)
        t.div_(s)
    return x


# --- dino: facebookresearch/dino eval_video_segmentation.py -------------------------------------------

def dino_read_frame(rgb: np.ndarray) -> torch.Tensor:
    """read_frame(): cv2.imread (BGR), short side 480, long side floored to 64, cv2.resize, /255, BGR->RGB,
    color_normalize with std (0.228, 0.224, 0.225)."""
    img = rgb[:, :, ::-1]
    ori_h, ori_w, _ = img.shape
    th = 480
    tw = int((th * ori_w / ori_h) // 64 * 64)
    img = cv2.resize(img, (tw, th)).astype(np.float32) / 255.0
    img = np.transpose(img[:, :, ::-1].copy(), (2, 0, 1))
    return color_normalize(torch.from_numpy(img).float(), (0.228, 0.224, 0.225))


def test_dino_frames_are_read_frames(frame):
    cfg = PRESETS["dino"]
    size = network_size(HEIGHT, WIDTH, cfg, 16)
    ours = network_input(torch.from_numpy(frame)[None], size, cfg)[0]
    expected = dino_read_frame(frame)
    assert size == (480, 832) and torch.equal(ours, expected)
    # either of the two old deviations is caught
    for wrong in (replace(cfg, resize="antialias"), replace(cfg, std=(0.229, 0.224, 0.225))):
        assert (network_input(torch.from_numpy(frame)[None], size, wrong)[0] - expected).abs().max() > 1e-3


def test_dino_first_frame_labels_are_read_seg(mask):
    """read_seg(): PIL NEAREST resize of the id image to (tw / 16, th / 16), to_one_hot with max id + 1."""
    small = np.array(Image.fromarray(mask).resize((832 // 16, 480 // 16), Image.NEAREST))
    expected = F.one_hot(torch.from_numpy(small.astype(np.int64)), int(small.max()) + 1).permute(2, 0, 1).float()
    ours = first_frame_labels(mask, (30, 52), "nearest")
    assert ours.shape[0] == 3  # the 5x5 object has no cell, as in the script
    assert torch.equal(ours, expected)


def dino_output(soft: torch.Tensor, patch: int, size: tuple[int, int]) -> np.ndarray:
    """eval_video_tracking_davis(): x patch bilinear, norm_mask (min-max per positive channel), torch.max,
    uint8, PIL NEAREST resize to the original (w, h)."""
    up = F.interpolate(soft[None], scale_factor=patch, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    for c in range(up.shape[0]):
        channel = up[c]
        if channel.max() > 0:
            channel = channel - channel.min()
            up[c] = channel / channel.max()
    _, ids = torch.max(up, dim=0)
    return np.array(Image.fromarray(ids.numpy().astype(np.uint8)).resize((size[1], size[0]), 0))


def test_dino_output_is_the_scripts(mask):
    soft = torch.softmax(torch.randn(3, 30, 52, generator=torch.Generator().manual_seed(0)) * 3, 0)
    expected = dino_output(soft.clone(), 16, (HEIGHT, WIDTH))
    ours = soft_to_mask(soft.clone(), (HEIGHT, WIDTH), PRESETS["dino"], 16)
    assert np.array_equal(ours, expected)
    # torch's nearest-exact rounds the exact half-way positions (e.g. column 640 <- 624.0) the other way
    columns = np.tile((np.arange(832) % 7).astype(np.uint8), (4, 1))
    pil = np.array(Image.fromarray(columns).resize((WIDTH, 4), 0))
    exact = F.interpolate(torch.from_numpy(columns)[None, None].float(), size=(4, WIDTH), mode="nearest-exact")
    assert not np.array_equal(exact[0, 0].byte().numpy(), pil)


# --- crw: ajabri/videowalk code/test.py, code/data/vos.py, code/utils/test_utils.py -------------------

def test_crw_cnn_sees_the_native_frame(frame):
    """vos.py load_image() with --cropSize -1: no resize, /255, color_normalize with ImageNet's std."""
    cfg = PRESETS["crw"]
    encoder = models.build("resnet18_crw").eval()
    encoder.remove_layers(["layer4"])
    assert pads_to_cover_frame(encoder)
    size = network_size(HEIGHT, WIDTH, cfg, 8, pads=True)
    assert size == (HEIGHT, WIDTH)
    ours = network_input(torch.from_numpy(frame)[None], size, cfg)[0]
    expected = color_normalize(torch.from_numpy(np.transpose(frame.astype(np.float32) / 255.0, (2, 0, 1)).copy()),
                               (0.229, 0.224, 0.225))
    assert torch.equal(ours, expected)
    # the padded convolutions give ceil(size / 8) cells: the grid of test.py's label maps
    x = network_input(torch.from_numpy(frame[:90, :100])[None], (90, 100), cfg)
    assert dense_features(encoder)(x).shape[-2:] == (math.ceil(90 / 8), math.ceil(100 / 8))


def palette_colours(ids: np.ndarray) -> np.ndarray:
    """The BGR image cv2.imread gives of a DAVIS palette PNG (VOC palette: 1 red, 2 green, 3 olive)."""
    palette = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]], np.uint8)
    return palette[ids][:, :, ::-1]


def test_crw_first_frame_labels_are_vos_labels(mask):
    """VOSDataset.__getitem__(): one-hot per unique colour of the first frame (np.unique order), cv2.resize
    of the float one-hot to (ceil(W / 8), ceil(H / 8)), INTER_LINEAR."""
    colours = palette_colours(mask)
    lblset = np.unique(colours.reshape(-1, 3), axis=0)
    onehot = np.stack([np.all(colours == c, axis=-1) for c in lblset], axis=-1)
    grid = (math.ceil(HEIGHT / 8), math.ceil(WIDTH / 8))
    expected = cv2.resize(np.float32(onehot), (grid[1], grid[0]))
    ours = first_frame_labels(mask, grid, "bilinear").permute(1, 2, 0).numpy()
    assert lblset.tolist() == [[0, 0, 0], [0, 0, 128], [0, 128, 0], [0, 128, 128]]  # colour order = id order
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def crw_output(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """dump_predictions(): cv2.resize of the (h, w, C) soft labels to the frame size, np.argmax."""
    return np.argmax(cv2.resize(pred, (size[1], size[0])), axis=-1)


@pytest.mark.parametrize("grid", [(60, 107), (30, 53)])  # crw on 854x480 (ceil); smtc's floor(854 / 16)
def test_crw_output_is_dump_predictions(grid):
    soft = torch.softmax(torch.randn(3, *grid, generator=torch.Generator().manual_seed(1)) * 3, 0)
    expected = crw_output(soft.permute(1, 2, 0).numpy().copy(), (HEIGHT, WIDTH))
    ours = soft_to_mask(soft, (HEIGHT, WIDTH), PRESETS["crw"], 8)
    assert (ours == expected).mean() > 0.9999  # float summation order may flip an exact near-tie


# --- smtc: shvdiwnkozbw/SMTC src/eval_prop.py, src/vos.py -------------------------------------------

def test_smtc_frames_are_interpolated_normalised_frames(frame):
    """eval_prop.py test(): the normalised float frames (vos.py, ImageNet std) of the video, as one
    (1, T, 3, H, W) tensor, interpolated trilinearly to (3, H // 16 * 16, W // 16 * 16)."""
    cfg = PRESETS["smtc"]
    size = network_size(HEIGHT, WIDTH, cfg, 16)
    normalised = color_normalize(torch.from_numpy(np.transpose(frame.astype(np.float32) / 255.0, (2, 0, 1)).copy()),
                                 (0.229, 0.224, 0.225))
    expected = F.interpolate(normalised[None, None], size=(3, *size), mode="trilinear")[0, 0]
    ours = network_input(torch.from_numpy(frame)[None], size, cfg)[0]
    assert size == (480, 848)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    antialiased = network_input(torch.from_numpy(frame)[None], size, replace(cfg, resize="antialias"))[0]
    assert (antialiased - expected).abs().max() > 1e-2


def test_smtc_label_grid_and_upsampled_features():
    """vos.py (SMTC's copy): label maps floor(H / mapScale) x floor(W / mapScale); eval_prop.py interpolates
    the feature maps trilinearly to that grid before the L2 norm: setting A (mapScale 16) leaves the 30x53
    map of a 480x848 frame as it is, setting B (mapScale 8) doubles it, as ``upsample=2`` does."""
    assert (480 // 16, 854 // 16) == (480 // 16, 848 // 16)
    fmap = torch.randn(2, 5, 30, 53, generator=torch.Generator().manual_seed(2))
    for scale in (1, 2):
        expected = F.interpolate(fmap.permute(1, 0, 2, 3)[None], (2, 480 * scale // 16, 854 * scale // 16),
                                 mode="trilinear")[0].permute(1, 0, 2, 3)
        ours = fmap if scale == 1 else F.interpolate(fmap, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert PRESETS["smtc_upsampled"].upsample == 2


def test_smtc_reads_the_last_block_before_the_final_norm():
    """SMTC's encoder forward (src/model/vision_transformer.py VisionTransformer.forward) returns the last
    block's patch tokens without the final LayerNorm, whatever checkpoint it was loaded from."""
    vit = models.build("vit_tiny_patch16", depth=2).eval()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    last_block = vit.get_intermediate_layers(x, n=1, norm=False)[0][:, 1:].transpose(1, 2).reshape(1, -1, 2, 3)
    smtc = dense_features(vit, final_norm=PRESETS["smtc"].final_norm)(x)
    torch.testing.assert_close(smtc, F.normalize(last_block, dim=1))
    assert not torch.allclose(dense_features(vit, final_norm=PRESETS["dino"].final_norm)(x), smtc)
    assert PRESETS["smtc_upsampled"].final_norm is False
