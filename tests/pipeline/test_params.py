import numpy as np
import pytest
import torch

from pipeline import params as P
from pipeline.views import ClipViews, GridViews, MulticropViews


def _check_boxes(boxes, width, height, scale, ratio):
    x0, y0, x1, y1 = boxes.T
    w, h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    assert (w > 0).all() and (h > 0).all()
    area = w * h / (width * height)
    # rounding w and h to pixels moves the area and aspect a little
    tol = 2.5 / min(w.min(), h.min())
    assert (area >= scale[0] * (1 - tol)).all() and (area <= scale[1] * (1 + tol)).all()
    assert (w / h >= ratio[0] * (1 - tol)).all() and (w / h <= ratio[1] * (1 + tol)).all()


@pytest.mark.parametrize("scale,ratio", [((0.4, 1.0), (3 / 4, 4 / 3)), ((0.05, 0.4), (3 / 4, 4 / 3)),
                                         ((0.25, 0.5), (0.7, 1.3))])
def test_random_resized_boxes_respect_scale_ratio_and_frame(scale, ratio):
    boxes = P.random_resized_boxes(np.random.default_rng(0), 640, 360, scale, ratio, 4000)
    _check_boxes(boxes, 640, 360, scale, ratio)
    # positions cover the frame: both edges are reached
    assert boxes[:, 0].min() == 0 and boxes[:, 2].max() == 640


def test_impossible_boxes_fall_back_to_a_centre_crop():
    # a 100x10 frame cannot hold a 0.9-area box of aspect <= 4/3: torchvision falls back to a centred
    # crop at the widest allowed aspect
    boxes = P.random_resized_boxes(np.random.default_rng(0), 100, 10, (0.9, 1.0), (3 / 4, 4 / 3), 5)
    assert boxes.tolist() == [[43, 0, 56, 10]] * 5


def test_grid_patch_boxes_jitter_inside_their_cells():
    spec = GridViews(frames=3, size=256, scale=(0.8, 0.95), ratio=(0.7, 1.3))
    drawn = P.draw(spec, np.random.default_rng(1), 320, 240, 30, label=-1, sample_id=0)
    boxes = drawn["patch_box"]                                     # (T, 49, 4)
    assert boxes.shape == (3, 49, 4) and spec.grid_side == 7
    cells = np.arange(7) * 32
    cx = np.tile(cells, 7)[None, :]
    cy = np.repeat(cells, 7)[None, :]
    assert (boxes[..., 0] >= cx).all() and (boxes[..., 2] <= cx + 64).all()
    assert (boxes[..., 1] >= cy).all() and (boxes[..., 3] <= cy + 64).all()
    local = boxes - np.stack([cx, cy, cx, cy], -1)
    _check_boxes(local.reshape(-1, 4), 64, 64, (0.7, 0.9), (3 / 4, 4 / 3))
    # jitter differs per frame and per patch (videowalk draws it per frame and per patch)
    assert len({tuple(b) for b in boxes.reshape(-1, 4)}) > 100
    x0, y0, x1, y1 = drawn["box"][0]
    assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240


def test_multicrop_views_are_drawn_inside_the_clip_region():
    spec = MulticropViews(frames=8, stride=30, region=True, scale=(0.2, 1.0),
                          global_crops=1, local_crops=6, local_size=112, per_frame_color=True)
    drawn = P.draw(spec, np.random.default_rng(3), 640, 360, 300, label=4, sample_id=9)
    assert drawn["box"].shape == (7, 4) and drawn["color"].shape == (7, 8, 7)
    lo, hi = drawn["box"][:, :2].min(0), drawn["box"][:, 2:].max(0)
    assert (lo >= 0).all() and hi[0] <= 640 and hi[1] <= 360
    assert drawn["meta"].tolist()[:2] == [4, 9] and drawn["meta"][2] + 7 * 30 + 1 <= 300
    # per-frame colour: the 8 frames of a view get different jitter draws (p 0.8 leaves some equal)
    assert len(np.unique(drawn["color"][:, :, 0])) > 20


def test_dino_recipe_probabilities():
    spec = MulticropViews(global_crops=2, local_crops=8)
    color = np.stack([P.draw(spec, np.random.default_rng(i), 64, 64, 1, -1, 0)["color"][:, 0] for i in range(3000)])
    blurred, solarized = (color[..., 5] > 0).mean(0), color[..., 6].mean(0)
    assert blurred[0] == 1.0 and abs(blurred[1] - 0.1) < 0.03 and abs(blurred[2:].mean() - 0.5) < 0.02
    assert solarized[0] == 0 and abs(solarized[1] - 0.2) < 0.03 and solarized[2:].max() == 0
    assert abs(color[..., 4].mean() - 0.2) < 0.01                 # grayscale
    jittered = color[..., 0] != 1.0
    assert abs(jittered.mean() - 0.8) < 0.01
    assert color[..., 0][jittered].min() >= 0.6 and color[..., 3].max() <= 0.1


def test_pack_unpack_round_trip_and_determinism():
    spec = MulticropViews(frames=2, stride=3, local_crops=3)
    a = P.draw(spec, np.random.default_rng(7), 200, 100, 12, 1, 2)
    b = P.draw(spec, np.random.default_rng(7), 200, 100, 12, 1, 2)
    row = P.pack(spec, a)
    assert np.array_equal(row, P.pack(spec, b)) and row.shape == (P.packed_size(spec),)
    back = P.unpack(spec, torch.from_numpy(np.stack([row, row])))
    for name, value in a.items():
        assert torch.equal(back[name][1], torch.from_numpy(np.asarray(value, dtype=np.float64)))


def test_per_frame_local_boxes_differ_across_frames_inside_the_region():
    """DoRA draws every frame of a local crop with its own RandomResizedCrop; the global crop keeps one box."""
    common = dict(frames=8, stride=30, region=True, scale=(0.2, 1.0), global_crops=1,
                  local_crops=6, local_size=112, per_frame_color=True)
    shared = P.draw(MulticropViews(**common), np.random.default_rng(3), 640, 360, 300, label=4, sample_id=9)
    spec = MulticropViews(**common, per_frame_local_boxes=True)
    drawn = P.draw(spec, np.random.default_rng(3), 640, 360, 300, label=4, sample_id=9)
    assert drawn["local_box"].shape == (6, 8, 4) and P.layout(spec)["local_box"] == (6, 8, 4)
    assert np.array_equal(drawn["box"][1:], drawn["local_box"][:, 0])
    # the region and the global box are drawn first, in the same order as with shared boxes
    assert np.array_equal(drawn["box"][0], shared["box"][0])
    assert all(len({tuple(b) for b in drawn["local_box"][v]}) == 8 for v in range(6))
    lo, hi = drawn["local_box"][..., :2].min((0, 1)), drawn["local_box"][..., 2:].max((0, 1))
    assert (lo >= 0).all() and hi[0] <= 640 and hi[1] <= 360
    unpacked = P.unpack(spec, torch.from_numpy(P.pack(spec, drawn))[None])["local_box"]
    assert torch.equal(unpacked[0], torch.from_numpy(drawn["local_box"]).double())


def _intersection(a, b):
    w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def test_neco_crops_overlap_every_earlier_global_crop_by_the_minimum():
    """NeCo's transform: crop i overlaps globals 0..min(i, G)-1 by > 1 % of the frame (2 % between globals);
    without the rule, the same scales often give disjoint pairs, so the rule does the work."""
    kw = dict(frames=1, global_crops=2, global_scale=(0.25, 1.0), local_crops=4,
              local_scale=(0.05, 0.25), flip=False)
    need = int(640 * 360 * 0.01)
    disjoint = 0
    for seed in range(200):
        box = P.draw(MulticropViews(**kw, min_overlap=0.01), np.random.default_rng(seed), 640, 360, 10, 0, 0)["box"]
        _check_boxes(box[2:], 640, 360, (0.05, 0.25), (3 / 4, 4 / 3))
        assert _intersection(box[1], box[0]) > 2 * need
        assert (_intersection(box[2:, None], box[None, :2]) > need).all()
        free = P.draw(MulticropViews(**kw), np.random.default_rng(seed), 640, 360, 10, 0, 0)["box"]
        disjoint += int((_intersection(free[2:, None], free[None, :2]) <= need).any())
    assert disjoint > 20


def test_overlap_rule_falls_back_to_the_first_global_box():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [90, 90, 100, 100]])
    # a 100 x 100 region with tiny local scales can never reach 50 % overlap: the first box is taken
    out = P.enforce_overlap(np.random.default_rng(0), boxes, 2, 100, 100, ((0.01, 0.01), (0.01, 0.01)),
                            (1.0, 1.0), 0.4, attempts=5)
    assert out[2].tolist() == [0, 0, 10, 10] and boxes[2].tolist() == [90, 90, 100, 100]


def test_boxes_and_overlap_belong_to_the_multicrop_family_with_one_box_per_view():
    with pytest.raises(TypeError, match="boxes"):
        ClipViews(boxes=True)
    with pytest.raises(ValueError, match="per_frame_local_boxes"):
        MulticropViews(frames=2, boxes=True, per_frame_local_boxes=True)
    with pytest.raises(ValueError, match="min_overlap"):
        MulticropViews(min_overlap=0.6)


def _colour_draws(spec, n):
    """(n, V, 7) colour parameters of n samples' draws (one frame of colour per view)."""
    return np.stack([P.draw(spec, np.random.default_rng(seed), 64, 48, 1, 0, 0)["color"][:, 0] for seed in range(n)])


def test_multicrop_blur_and_solarize_follow_the_global_probabilities_over_many_draws():
    dino = MulticropViews(global_crops=2, local_crops=3)
    neco = MulticropViews(global_crops=2, local_crops=3, global_blur=(0.5, 0.5), global_solarize=(0.0, 0.0))
    for spec, blur, solarize in [(dino, [1.0, 0.1, 0.5, 0.5, 0.5], [0.0, 0.2, 0.0, 0.0, 0.0]),
                                 (neco, [0.5] * 5, [0.0] * 5)]:
        color = _colour_draws(spec, 2000)
        sigma = color[..., 5]
        assert np.abs((sigma > 0).mean(0) - blur).max() < 0.04
        assert np.abs(color[..., 6].mean(0) - solarize).max() < 0.04
        assert sigma[sigma > 0].min() >= 0.1 and sigma.max() <= 2.0
    assert (color[..., 6] == 0).all()   # NeCo: never solarized
