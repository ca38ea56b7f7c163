"""Does training help? A tiny CRW trained for a minute must beat its own initialisation on held-out
synthetic sequences (label propagation J&F), the learning benchmark's claim in miniature."""
import pytest

from train import learning, run

# 16 training videos and 4 held-out sequences of 128x96 (another seed); the quarter-width trunk,
# 30 steps of 4 clips at a high peak LR. docs/learning.md §6 has the measured gain and the run with
# the loss replaced by a constant, which this test fails.
DATA = learning.Data(train_videos=16, eval_sequences=4, frames=32, width=128, height=96)
SETTING = learning.Setting(30, ("--model.arch", "resnet18_crw_w16", "--data.batch_size", "4", "--crw.size", "96",
                                "--crw.patch_size", "32", "--crw.patch_stride", "16", "--crw.frame_stride", "2",
                                "--optim.lr", "3e-3", "--optim.min_lr", "3e-4"), "crw", 192)
# Measured (2-core x86-64, 2026-12-02, twice, the second time in a rebuilt environment): trained 0.228,
# step 0 0.184. With the walk's loss replaced by a constant, only BatchNorm's running statistics move
# and J&F falls to 0.140, so the test fails. The run is deterministic, and its seed matters: random
# quarter-width trunks score 0.13-0.29 at step 0 (docs/learning.md section 4).
MIN_GAIN = 0.015


@pytest.mark.slow
def test_a_tiny_crw_beats_its_initialisation(tmp_path):
    shards, davis = learning.prepare_data(tmp_path, DATA)
    # In process (not learning.train's subprocess), so that a patched loss reaches the run
    assert run.main([*learning.train_argv("crw", SETTING, "cpu", shards, tmp_path / "run"),
                     "--data.num_workers", "0"]) == 0
    trained = learning.label_propagation(["--ckpt", str(tmp_path / "run")], davis, SETTING, tmp_path / "eval-trained")
    init = learning.label_propagation(["--ckpt", str(tmp_path / "run" / "init" / "backbone.safetensors")], davis,
                                      SETTING, tmp_path / "eval-init")
    assert trained["J&F"] >= init["J&F"] + MIN_GAIN, f"J&F trained {trained['J&F']:.3f} vs step 0 {init['J&F']:.3f}"
