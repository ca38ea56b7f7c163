"""The learning table and the demo report's curves."""
import numpy as np

from train.learning import SETTINGS, markdown_table
from train.report import CURVE_SIZE, curves


def test_crw_curves_include_return_accuracy_and_are_drawn():
    log = [{"step": s, "loss": 3.2 - 0.1 * s, "acc_k1": 0.04 * s, "acc_k2": 0.02 * s} for s in range(1, 6)]
    plots = curves(log)
    assert set(plots) == {"loss", "return_accuracy"}
    for image in plots.values():
        assert image.shape == (CURVE_SIZE[1], CURVE_SIZE[0], 3) and image.dtype == np.uint8
        assert (image != 255).any(axis=2).mean() > 0.01  # axes, labels and lines were drawn


def test_table_row_shows_scores_and_gains():
    scores = {k: {"J&F": v, "J": v - 0.01, "F": v + 0.01} for k, v in (("trained", 0.6), ("init", 0.4), ("pixels", 0.5))}
    row = {"method": "crw", "steps": 60, "wall_s": 100.0, "cpu_s": 180.0, "loss_first": 3.2, "loss_last": 2.5,
           "scores": scores, "gain_over_init": 0.2, "gain_over_pixels": 0.1}
    line = markdown_table([row]).splitlines()[-1]
    assert line.startswith("| crw | 60 | 100 (180) | 3.200 → 2.500 | 0.600 | 0.400 | 0.500 |")
    assert line.endswith("| +0.200 | +0.100 |") and "0.590 / 0.390 / 0.490" in line


def test_every_method_has_both_budgets():
    assert all(set(budgets) == {"cpu", "gpu"} for budgets in SETTINGS.values())
