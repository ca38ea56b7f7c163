"""J and F against hand-computed values and a brute-force disk dilation; statistics; folder scoring."""
import csv

import numpy as np
import pytest
from scipy import ndimage

from eval import davis_metrics as dm
from eval.davis_io import write_davis_folder, write_mask


def box(dy=0, dx=0, shape=(480, 854)):
    mask = np.zeros(shape, bool)
    mask[100 + dy:200 + dy, 300 + dx:500 + dx] = True
    return mask


def reference_f(gt, pred, radius):
    """F with an explicit disk structuring element and binary dilation (the toolkit's recipe)."""
    offsets = np.arange(-radius, radius + 1)
    disk = offsets[:, None] ** 2 + offsets[None] ** 2 <= radius ** 2
    bg, bp = dm.boundary_map(gt), dm.boundary_map(pred)
    precision = (bp & ndimage.binary_dilation(bg, disk)).sum() / bp.sum()
    recall = (bg & ndimage.binary_dilation(bp, disk)).sum() / bg.sum()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_tolerance_radius_is_8_pixels_at_480p():
    assert dm.tolerance_radius(480, 854) == 8.0
    assert dm.tolerance_radius(480, 854, bound_th=3) == 3.0


def test_boundary_map_rules():
    seg = np.zeros((4, 5), bool)
    seg[1:3, 1:3] = True
    # a pixel is boundary when it differs from its east, south or south-east neighbour:
    # the square's own last row/column and the cells just above/left of it
    expected = np.array([[1, 1, 1, 0, 0],
                         [1, 0, 1, 0, 0],
                         [1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0]], bool)
    assert np.array_equal(dm.boundary_map(seg), expected)
    full = np.ones((3, 3), bool)
    assert not dm.boundary_map(full).any()  # last row/column compare with one neighbour only


def test_shifted_boxes_hand_computed():
    gt = box()
    shifted = box(3, 4)
    inter, union = 97 * 196, 2 * 100 * 200 - 97 * 196
    assert dm.region_similarity(gt, shifted) == pytest.approx(inter / union)
    assert dm.boundary_f_measure(gt, shifted) == pytest.approx(1.0)  # every boundary pixel within 8 px
    far = box(10, 15)
    assert dm.region_similarity(gt, far) == pytest.approx(90 * 185 / (40000 - 90 * 185))
    assert dm.boundary_f_measure(gt, far) == pytest.approx(reference_f(gt, far, 8))
    assert 0.0 < dm.boundary_f_measure(gt, far) < 0.1


def test_f_equals_bruteforce_dilation_on_random_blobs():
    rng = np.random.default_rng(0)
    gts = ndimage.gaussian_filter(rng.random((6, 60, 90)), (0, 3, 3)) > 0.5
    preds = ndimage.gaussian_filter(rng.random((6, 60, 90)), (0, 3, 3)) > 0.5
    radius = int(dm.tolerance_radius(60, 90))
    ours = dm.boundary_f_measure(gts, preds)  # all frames in one call
    assert ours == pytest.approx([reference_f(g, p, radius) for g, p in zip(gts, preds)])


@pytest.mark.parametrize("gt_empty, pred_empty, expected_j, expected_f", [
    (False, True, 0.0, 0.0),   # object missed: no predicted boundary -> P=1, R=0
    (True, False, 0.0, 0.0),   # object hallucinated: P=0, R=1
    (True, True, 1.0, 1.0),    # absent and not predicted
])
def test_empty_mask_cases(gt_empty, pred_empty, expected_j, expected_f):
    empty = np.zeros((480, 854), bool)
    gt = empty if gt_empty else box()
    pred = empty if pred_empty else box()
    assert dm.region_similarity(gt, pred) == expected_j
    assert dm.boundary_f_measure(gt, pred) == expected_f


def test_void_pixels_are_ignored_when_given():
    gt, pred = box(), box()
    pred[150:160, 0:50] = True            # a false positive ...
    void = np.zeros_like(gt)
    void[140:170, 0:60] = True            # ... entirely inside the void region
    assert dm.region_similarity(gt, pred, void) == 1.0
    assert dm.boundary_f_measure(gt, pred, void) == 1.0
    assert dm.region_similarity(gt, pred) < 1.0


def test_statistics_mean_recall_decay():
    mean, recall, decay = dm.object_statistics(np.arange(10.0))
    # quarters of 10 frames: ids [0, 2, 5, 7, 9], bins share their end frame: [0..2] and [7..9]
    assert (mean, recall, decay) == (4.5, 0.9, pytest.approx(1.0 - 8.0))
    assert dm.object_statistics(np.array([0.5, 0.6, 0.4, 1.0]))[1] == 0.5  # strictly above 0.5


def test_decay_beyond_256_frames():
    values = np.arange(300.0)
    # ids = [0, 75, 150, 224, 299]: first bin 0..75 (mean 37.5), last bin 224..299 (mean 261.5).
    # The toolkit's uint8 cast would turn 299 into 43 and make the last bin empty.
    assert dm.object_statistics(values)[2] == pytest.approx(37.5 - 261.5)
    values = np.r_[np.ones(150), np.zeros(150)]
    assert dm.object_statistics(values)[2] == pytest.approx(1.0)


def make_sequences(frames=6, shape=(48, 64)):
    """Two sequences: 'one' has one object, 'two' has two."""
    def video(objects):
        masks = []
        for t in range(frames):
            mask = np.zeros(shape, np.uint8)
            mask[5 + t:20 + t, 5:25] = 1
            if objects == 2:
                mask[25:40, 30 + t:50 + t] = 2
            masks.append(mask)
        images = [np.full((*shape, 3), 40 * t, np.uint8) for t in range(frames)]
        return images, masks
    return {"one": video(1), "two": video(2)}


def test_folder_scoring_aggregates_over_objects_and_skips_first_and_last(tmp_path):
    sequences = make_sequences()
    davis = write_davis_folder(tmp_path / "davis", sequences)
    results = tmp_path / "results"
    for name, (_, masks) in sequences.items():
        for t, mask in enumerate(masks[1:-1], start=1):  # frames 0 and 5 are not needed
            pred = mask.copy()
            if name == "two":
                pred[pred == 2] = 0   # object 2 of 'two' is never predicted
            write_mask(results / name / f"{t:05d}.png", pred)
    scores = dm.evaluate_folder(davis, results)
    table = dm.global_table(scores)
    # three objects: two perfect, one missed in every scored frame
    assert table["J-Mean"] == pytest.approx(2 / 3)
    assert table["F-Mean"] == pytest.approx(2 / 3)
    assert table["J&F-Mean"] == pytest.approx(2 / 3)
    assert table["J-Recall"] == pytest.approx(2 / 3)
    assert scores[1].j.shape == (2, 4)


def test_prediction_with_unknown_object_id_is_rejected(tmp_path):
    sequences = make_sequences()
    davis = write_davis_folder(tmp_path / "davis", sequences)
    for name, (_, masks) in sequences.items():
        for t, mask in enumerate(masks):
            write_mask(tmp_path / "res" / name / f"{t:05d}.png", mask * 3)
    with pytest.raises(ValueError, match="object id"):
        dm.evaluate_folder(davis, tmp_path / "res")


def test_missing_prediction_names_the_file(tmp_path):
    davis = write_davis_folder(tmp_path / "davis", make_sequences())
    with pytest.raises(FileNotFoundError, match="00001.png"):
        dm.evaluate_folder(davis, tmp_path / "empty")


def test_cli_prints_table_and_writes_csvs(tmp_path, capsys):
    sequences = make_sequences()
    davis = write_davis_folder(tmp_path / "davis", sequences)
    for name, (_, masks) in sequences.items():
        for t, mask in enumerate(masks):
            write_mask(tmp_path / "res" / name / f"{t:05d}.png", mask)
    table = dm.main(["--davis", str(davis), "--results", str(tmp_path / "res")])
    assert table["J&F-Mean"] == 1.0
    assert "J&F-Mean" in capsys.readouterr().out
    with open(tmp_path / "res" / "global_results-val.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["J-Mean"]) == 1.0
    with open(tmp_path / "res" / "per-sequence_results-val.csv") as handle:
        assert [r["Sequence"] for r in csv.DictReader(handle)] == ["one_1", "two_1", "two_2"]


def test_cli_out_creates_a_folder_that_does_not_exist_yet(tmp_path):
    sequences = make_sequences()
    davis = write_davis_folder(tmp_path / "davis", sequences)
    for name, (_, masks) in sequences.items():
        for t, mask in enumerate(masks):
            write_mask(tmp_path / "res" / name / f"{t:05d}.png", mask)
    out = tmp_path / "scores" / "davis-val"
    dm.main(["--davis", str(davis), "--results", str(tmp_path / "res"), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["global_results-val.csv", "per-sequence_results-val.csv"]
    assert not (tmp_path / "res" / "global_results-val.csv").exists()


def test_unsupervised_matching_is_one_per_sequence():
    rng = np.random.default_rng(1)
    gt = np.zeros((5, 32, 32), np.uint8)
    gt[:, 2:12, 2:12] = 1
    gt[:, 18:30, 18:30] = 2
    gt[:, 0, :] = 255                    # void row
    pred = np.where(gt == 1, 7, np.where(gt == 2, 3, 0)).astype(np.uint8)  # same objects, other ids
    pred[:, 0, :] = rng.integers(0, 8, 32)  # noise inside the void is ignored
    scores, assignment = dm.score_unsupervised("seq", gt, pred)
    assert list(assignment) == [7, 3]
    assert np.allclose(scores.j, 1.0) and np.allclose(scores.f, 1.0)
    with pytest.raises(ValueError, match="at most 20"):
        dm.score_unsupervised("seq", gt, np.full_like(gt, 21))


def test_matches_official_toolkit_when_available():
    """Cross-check against davisvideochallenge/davis2017-evaluation's own metrics.py, loaded by path from
    a checkout named by $DAVIS2017_EVALUATION (needs opencv and scikit-image; skipped otherwise)."""
    import importlib.util
    import os

    checkout = os.environ.get("DAVIS2017_EVALUATION")
    if not checkout:
        pytest.skip("set DAVIS2017_EVALUATION to a davis2017-evaluation checkout to cross-check")
    pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    spec = importlib.util.spec_from_file_location("davis_toolkit_metrics", f"{checkout}/davis2017/metrics.py")
    toolkit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toolkit)
    if not hasattr(np, "bool"):
        np.bool = bool  # the toolkit still spells numpy's removed alias
    rng = np.random.default_rng(5)
    gts = ndimage.gaussian_filter(rng.random((4, 120, 200)), (0, 6, 6)) > 0.5
    preds = ndimage.gaussian_filter(rng.random((4, 120, 200)), (0, 6, 6)) > 0.5
    preds[1] = False
    gts[2] = False
    assert dm.region_similarity(gts, preds) == pytest.approx(toolkit.db_eval_iou(gts, preds))
    assert dm.boundary_f_measure(gts, preds) == pytest.approx(toolkit.db_eval_boundary(gts, preds))


def test_cropped_pair_scoring_equals_full_frame():
    rng = np.random.default_rng(7)
    gt = np.zeros((5, 60, 80), bool)
    pred = np.zeros_like(gt)
    gt[:, 10:30, 20:45] = True
    pred[:, 12:33, 18:44] = True
    gt[3, 50:60, 70:80] = True           # touches the bottom-right image corner
    pred[4] = False                      # missed object in one frame
    void = rng.random(gt.shape) > 0.97
    for v in (None, void):
        j, f = dm.score_pair(gt, pred, v)
        assert j == pytest.approx(dm.region_similarity(gt, pred, v))
        assert f == pytest.approx(dm.boundary_f_measure(gt, pred, v))
    empty = np.zeros_like(gt)
    assert [x.tolist() for x in dm.score_pair(empty, empty)] == [[1.0] * 5, [1.0] * 5]
