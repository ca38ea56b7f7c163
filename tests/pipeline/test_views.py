import numpy as np
import pytest
import torch

from pipeline import params as P
from pipeline.views import ClipViews, GridViews, MulticropViews, crop_resize, render


def _ramp_frames(n=2, height=40, width=60):
    """uint8 (n, H, W, 3): R = 50 * frame, G = 4 * x, B = 6 * y."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    frames = torch.stack([torch.zeros_like(x), 4 * x, 6 * y], -1).expand(n, -1, -1, -1).clone()
    frames[..., 0] = (50 * torch.arange(n)).view(n, 1, 1)
    return frames.to(torch.uint8)


def test_crop_resize_samples_the_box_at_pixel_centres():
    frames = _ramp_frames().permute(0, 3, 1, 2)
    boxes = torch.tensor([[10, 4, 50, 36], [0, 0, 60, 40]])
    out = crop_resize(frames, boxes, torch.tensor([[0, 1], [1, 1]]), 16).float()
    assert out.shape == (2, 2, 3, 16, 16)
    # a linear ramp resized by a symmetric filter is the ramp at the output pixel centres
    # (interior pixels, where the filter is not clipped by the box edge)
    centres = (torch.arange(16) + 0.5) * 40 / 16 - 0.5 + 10
    assert torch.allclose(out[0, 0, 1, 3, 2:-2], 4 * centres[2:-2], atol=0.75)
    rows = (torch.arange(16) + 0.5) * 32 / 16 - 0.5 + 4
    assert torch.allclose(out[0, 1, 2, 2:-2, 5], 6 * rows[2:-2], atol=0.75)
    # frame ids pick the frame: R is 50 * frame
    assert out[0, 0, 0].max() == 0 and (out[0, 1, 0] == 50).all() and (out[1, :, 0] == 50).all()


def test_crop_resize_at_scale_one_is_a_slice():
    frames = torch.randint(0, 256, (1, 3, 30, 30), dtype=torch.uint8)
    out = crop_resize(frames, torch.tensor([[5, 7, 25, 27]]), torch.tensor([[0]]), 20)
    assert torch.equal(out[0, 0], frames[0, :, 7:27, 5:25])


def _raw(x, spec):
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    return (x * std + mean) * 255


def _rows(spec, frames, batch, width, height, nframes=10):
    return torch.from_numpy(np.stack([P.pack(spec, P.draw(spec, np.random.default_rng(b), width, height,
                                                          nframes, label=b, sample_id=b))
                                      for b in range(batch)]))


@pytest.mark.parametrize("spec,keys", [
    (ClipViews(frames=3, size=24, color=False), {"clip": (2, 3, 3, 24, 24)}),
    (MulticropViews(frames=2, global_size=32, local_size=12, local_crops=3, color=False),
     {"global": (2, 2, 2, 3, 32, 32), "local": (2, 3, 2, 3, 12, 12)}),
    (MulticropViews(frames=1, global_crops=1, local_crops=0, global_size=16),
     {"global": (2, 1, 1, 3, 16, 16)}),
    (GridViews(frames=2, size=32, patch_size=16, patch_stride=8, color=False),
     {"patches": (2, 2, 9, 3, 16, 16)}),
])
def test_render_shapes_labels_and_frame_order(spec, keys):
    T, B = spec.frames, 2
    frames = _ramp_frames(B * T)
    rows = _rows(spec, frames, B, 60, 40)
    batch = render(frames, P.unpack(spec, rows), spec)
    assert {k: tuple(v.shape) for k, v in batch.items() if k not in ("label", "sample")} == keys
    assert batch["label"].tolist() == [0, 1] and batch["sample"].dtype == torch.int64
    if not spec.color:
        name = next(iter(keys))
        views = batch[name] if name != "global" else batch[name][:, 0]
        red = _raw(views, spec)[..., 0, :, :].mean((-1, -2))
        if name == "patches":
            red = red[:, :, 0]
        # frame t of sample b carries R = 50 * (b*T + t)
        assert torch.allclose(red, 50.0 * torch.arange(B * T, dtype=torch.float32).view(B, T), atol=0.6)


def test_flip_mirrors_the_view():
    spec = ClipViews(frames=1, size=20, color=False)
    frames = _ramp_frames(1)
    rows = _rows(spec, frames, 1, 60, 40)
    params = P.unpack(spec, rows)
    params["flip"][:] = 0
    plain = render(frames, params, spec)["clip"]
    params["flip"][:] = 1
    flipped = render(frames, params, spec)["clip"]
    assert torch.allclose(flipped, plain.flip(-1))
    green = _raw(plain, spec)[0, 0, 1, 10]
    assert (green[1:] > green[:-1]).all()           # x grows left to right unless flipped


def test_clip_color_draws_colour_one_crop_independently():
    # SMTC: one crop, its student and teacher colourings drawn apart
    spec = ClipViews(frames=3, size=24, flip=False, color_draws=2)
    frames = _ramp_frames(2 * 3)
    params = P.unpack(spec, _rows(spec, frames, 2, 60, 40))
    assert params["color"].shape == (2, 2, 1, 7) and not torch.equal(params["color"][:, 0], params["color"][:, 1])
    clip = render(frames, params, spec)["clip"]
    assert clip.shape == (2, 2, 3, 3, 24, 24) and not torch.allclose(clip[:, 0], clip[:, 1])
    params["color"][:, 1] = params["color"][:, 0]           # the same colouring: the same pixels
    same = render(frames, params, spec)["clip"]
    assert torch.equal(same[:, 0], same[:, 1])
    plain = ClipViews(frames=3, size=24, flip=False)
    assert P.layout(plain)["color"] == (1, 1, 7)
    with pytest.raises(TypeError, match="color_draws"):
        MulticropViews(color_draws=2)
    with pytest.raises(ValueError, match="color_draws"):
        ClipViews(color_draws=2, color=False)


def test_grid_patches_come_from_their_cells():
    spec = GridViews(frames=1, size=32, scale=(1.0, 1.0), ratio=(1.5, 1.5), patch_size=16,
                     patch_stride=8, patch_scale=(1.0, 1.0), flip=False, color=False)
    frames = _ramp_frames(1, height=32, width=48)        # aspect 1.5: the clip crop is the whole frame
    params = P.unpack(spec, _rows(spec, frames, 1, 48, 32))
    assert params["box"][0, 0].tolist() == [0, 0, 48, 32]
    patches = _raw(render(frames, params, spec)["patches"], spec)[0, 0]    # (9, 3, 16, 16)
    # patch (row i, col j) starts at (8j, 8i) of the 32x32 resize of the 48x32 frame
    green = patches[:, 1, 8, 0].view(3, 3)
    blue = patches[:, 2, 0, 8].view(3, 3)
    assert (green[:, 1:] > green[:, :-1] + 20).all() and (green.std(0) < 1).all()
    assert (blue[1:] > blue[:-1] + 20).all() and (blue.std(1) < 1).all()


def test_roi_align_branch_matches_the_cpu_resize_on_a_720p_frame():
    # the CUDA branch of crop_resize, run on the CPU: in half precision it was up to 12 levels off
    # (roi_align sums and places its samples in the input dtype), in float32 it agrees with interpolate
    from pipeline.views import roi_crop_resize

    y, x = torch.meshgrid(torch.arange(720.0), torch.arange(1280.0), indexing="ij")
    frames = torch.stack([x / 5.1, y / 2.9, (x + y) / 7.9], 0).clamp(0, 255).to(torch.uint8)[None]
    boxes = torch.tensor([[101, 37, 1203, 701], [600, 300, 1270, 715]])
    ids = torch.tensor([[0], [0]])
    for size in (96, 224):
        cpu = crop_resize(frames, boxes, ids, size).float()
        roi = roi_crop_resize(frames, boxes, ids, size)
        assert roi.dtype == torch.float32
        inner = (slice(None),) * 3 + (slice(2, -2), slice(2, -2))
        assert (cpu[inner] - roi[inner]).abs().max() <= 1.0   # half: 2.5


def test_per_frame_local_boxes_crop_each_frame_at_its_own_box():
    spec = MulticropViews(frames=3, region=True, scale=(0.5, 1.0), global_crops=1, global_size=16,
                          local_crops=2, local_size=8, local_scale=(0.1, 0.3), flip=False, color=False,
                          per_frame_local_boxes=True)
    B, T = 2, 3
    frames = _ramp_frames(B * T)
    params = P.unpack(spec, _rows(spec, frames, B, 60, 40))
    batch = render(frames, params, spec)
    assert batch["local"].shape == (B, 2, T, 3, 8, 8)
    nchw = frames.permute(0, 3, 1, 2)
    for b in range(B):
        for v in range(2):
            for t in range(T):
                box = params["local_box"][b, v, t].long()[None]
                expected = crop_resize(nchw, box, torch.tensor([[b * T + t]]), 8)[0, 0].float()
                assert torch.allclose(_raw(batch["local"][b, v, t], spec), expected, atol=1e-3)
    boxes = params["local_box"][:, :, :, :2]
    assert (boxes[:, :, 1:] != boxes[:, :, :1]).any()      # the frames of a local crop moved
