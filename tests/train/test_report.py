"""The learning table and the demo report's curves."""
import numpy as np

import pytest

from train.config import load_config
from train.learning import SETTINGS, markdown_table, with_starts
from train.run import parse_args
from train.report import CURVE_SIZE, curves, truth_over_prediction


def test_crw_curves_include_return_accuracy_and_are_drawn():
    log = [{"step": s, "loss": 3.2 - 0.1 * s, "acc_k1": 0.04 * s, "acc_k2": 0.02 * s} for s in range(1, 6)]
    plots = curves(log)
    assert set(plots) == {"loss", "return_accuracy"}
    for image in plots.values():
        assert image.shape == (CURVE_SIZE[1], CURVE_SIZE[0], 3) and image.dtype == np.uint8
        assert (image != 255).any(axis=2).mean() > 0.01  # axes, labels and lines were drawn


def test_table_row_shows_scores_and_gains():
    scores = {k: {"J&F": v, "J": v - 0.01, "F": v + 0.01} for k, v in (("trained", 0.6), ("init", 0.4), ("pixels", 0.5))}
    row = {"method": "crw", "start_from": None, "steps": 60, "wall_s": 100.0, "cpu_s": 180.0, "loss_first": 3.2, "loss_last": 2.5,
           "scores": scores, "gain_over_init": 0.2, "gain_over_pixels": 0.1}
    line = markdown_table([row]).splitlines()[-1]
    assert line.startswith("| crw | 60 | 100 (180) | 3.200 → 2.500 | 0.600 | 0.400 | 0.500 |")
    assert line.endswith("| +0.200 | +0.100 |") and "0.590 / 0.390 / 0.490" in line


def test_every_method_has_both_budgets_on_synthetic_and_real_data():
    assert all(set(budgets) == {"cpu", "gpu", "cpu-real", "gpu-real"} for budgets in SETTINGS.values())


def test_a_row_that_fine_tunes_names_its_start():
    scores = {k: {"J&F": 0.5, "J": 0.5, "F": 0.5} for k in ("trained", "init", "pixels")}
    row = {"method": "timet", "start_from": "dino", "steps": 100, "wall_s": 1.0, "cpu_s": 2.0, "loss_first": 3.0,
           "loss_last": 2.0, "scores": scores, "gain_over_init": 0.0, "gain_over_pixels": 0.0}
    assert markdown_table([row]).splitlines()[-1].startswith("| timet (from dino) | 100 |")


def test_methods_are_trained_after_the_run_they_start_from():
    starts = {m: b["cpu"].start_from for m, b in SETTINGS.items() if b["cpu"].start_from}
    assert starts, "no CPU row fine-tunes another row's network"
    method, start = next(iter(starts.items()))
    assert with_starts([method], "cpu") == [start, method]                  # the start is added first
    assert with_starts([method, start, method], "cpu") == [start, method]   # once, in order
    assert with_starts(["crw"], "cpu") == ["crw"]


@pytest.mark.parametrize("budget", ["cpu", "gpu", "cpu-real"])
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_every_setting_is_a_valid_configuration(method, budget):
    setting = SETTINGS[method][budget]
    assert setting.start_from in (None, *SETTINGS)
    args, overrides = parse_args(["--method", method, "--data", "shards", "--out", "run", *setting.train_args])
    cfg = load_config(method, overrides=overrides)   # a misspelt flag or a bad value raises here
    assert cfg.run.steps > 0


def test_strips_show_the_truth_above_the_trained_and_the_step_0_predictions():
    frames = [np.full((48, 64, 3), 128, np.uint8)] * 3
    truth, trained, init = ([np.full((48, 64), label, np.uint8)] * 3 for label in (1, 0, 1))
    picture = truth_over_prediction(frames, truth, trained, init)
    assert picture.shape == (3 * 160, 3 * round(64 * 160 / 48), 3)   # three strips of three 160-px frames
    row = lambda i: picture[i * 160:(i + 1) * 160]  # noqa: E731
    assert (row(0) == row(2)).all() and not (row(0) == row(1)).all()  # each strip shows its own masks
