"""eval/run.py end to end on the synthetic fixtures with a tiny exported ViT."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from eval.run import UsageError
from models.io import export_backbone

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding only an exported random-init ViT-tiny/16 (what eval reads)."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    export_backbone(models.build("vit_tiny_patch16"), run / "backbone.safetensors")
    return run


def run_eval(*args):
    from eval import run
    return run.main([str(a) for a in args])


def test_labelprop_on_folder_and_shards_agree(run_dir, davis_dir, eval_shards, tmp_path):
    common = ["--ckpt", run_dir, "--protocol", "crw", "--context", "4", "--device", "cpu"]
    folder = run_eval("labelprop", *common, "--data", davis_dir, "--out", tmp_path / "a", "--visualize")
    shards = run_eval("labelprop", *common, "--data", eval_shards, "--out", tmp_path / "b")
    assert 0.0 <= folder["scores"]["J&F-Mean"] <= 1.0
    assert folder["scores"] == shards["scores"]  # same bytes, same numbers
    written = json.loads((tmp_path / "a" / "labelprop.json").read_text())
    assert written["scores"]["J-Mean"] == folder["scores"]["J-Mean"]
    assert (tmp_path / "a" / "global_results-val.csv").is_file()
    assert len(list((tmp_path / "a" / "synth00").glob("*.png"))) == 32
    assert (tmp_path / "a" / "vis" / "synth00.gif").is_file()


def test_clusters_frame_and_overclustering(run_dir, davis_dir, tmp_path, capsys):
    result = run_eval("clusters", "--ckpt", run_dir, "--data", davis_dir, "--granularity", "clip",
                      "--clip-frames", "8", "--size", "64", "--eval-size", "32", "--out", tmp_path, "--device", "cpu")
    assert result["scores"]["units"] == 8 and 0.0 < result["scores"]["mIoU"] <= 1.0
    summary = capsys.readouterr().out.strip().splitlines()[-1]  # the table above it, the progress bars on stderr
    assert summary == (f"clusters: 8 units, mIoU {result['scores']['mIoU']:.3f}, {result['seconds']:.1f} s; "
                       f"wrote {tmp_path / 'clusters.json'}")
    over = run_eval("clusters", "--ckpt", run_dir, "--data", davis_dir, "--granularity", "dataset", "--k", "12",
                    "--overcluster", "--size", "64", "--eval-size", "16", "--out", tmp_path, "--device", "cpu")
    assert over["scores"]["units"] == 1 and over["scores"]["matching"].startswith("many-to-one")


def test_knn_and_linear_on_labelled_shards(run_dir, jpeg_shards, tmp_path):
    knn = run_eval("knn", "--ckpt", run_dir, "--data", jpeg_shards, "--frames-per-sample", "3",
                   "--holdout-every", "2", "--out", tmp_path, "--device", "cpu")
    assert knn["scores"]["test"] == 9 and knn["scores"]["train"] == 9
    assert 0.0 <= knn["scores"]["top1"] <= 100.0
    linear = run_eval("linear", "--ckpt", run_dir, "--data", jpeg_shards, "--val-data", jpeg_shards,
                      "--epochs", "5", "--out", tmp_path, "--device", "cpu")
    assert linear["scores"]["train"] == linear["scores"]["test"] == 6


@pytest.fixture(scope="module")
def unsupervised_davis(davis_dir, tmp_path_factory):
    """`davis_dir` with its masks also as the unsupervised task's (Annotations_unsupervised)."""
    unsupervised = shutil.copytree(davis_dir, tmp_path_factory.mktemp("unsupervised") / "davis")
    shutil.copytree(unsupervised / "Annotations", unsupervised / "Annotations_unsupervised")
    return unsupervised


def test_discovery_official_protocol(run_dir, unsupervised_davis, tmp_path):
    result = run_eval("discovery", "--ckpt", run_dir, "--data", unsupervised_davis, "--proposals", "4",
                      "--out", tmp_path / "out", "--device", "cpu")
    assert result["protocol"].startswith("official") and result["proposals_from"] == "features"
    assert 0.0 <= result["scores"]["J&F-Mean"] <= 1.0
    with pytest.raises(UsageError, match="holds no slots.safetensors"):
        run_eval("discovery", "--ckpt", run_dir, "--data", unsupervised_davis, "--proposals-from", "slots",
                 "--out", tmp_path / "none")


def test_smtc_run_is_evaluated_from_its_slots_and_features(jpeg_shards, davis_dir, unsupervised_davis, tmp_path,
                                                           capsys):
    """One tiny SMTC step through train/run.py, then eval/run.py with no method-specific flag: discovery
    reads the exported slots, labelprop --protocol smtc the encoder's un-normed tokens."""
    from train import run as train_run
    from train.gpu_report import DRY_RUN_OVERRIDES

    smtc = tmp_path / "smtc"
    assert train_run.main(["--method", "smtc", "--data", str(jpeg_shards), "--out", str(smtc), "--steps", "1", "--cpu",
                           "--data.batch_size", "2", "--data.num_workers", "0", *DRY_RUN_OVERRIDES["smtc"]]) == 0
    capsys.readouterr()
    result = run_eval("discovery", "--ckpt", smtc, "--data", unsupervised_davis, "--proposals", "4", "--device", "cpu")
    printed = capsys.readouterr().out
    assert printed.startswith("discovery: proposals from the slots") and "proposals from slots" in printed
    written = json.loads((smtc / "eval" / "discovery" / "discovery.json").read_text())
    assert written["proposals_from"] == result["proposals_from"] == "slots"
    assert written["proposal_settings"]["iters"] == 5 and written["proposal_settings"]["clip_frames"] == 3
    assert 0.0 <= written["scores"]["J&F-Mean"] <= 1.0
    from eval.davis_io import read_mask
    for sequence, pairs in written["proposal_slots"].items():  # ids 1..K, K <= 4, each a (slot, instance) pair
        pngs = sorted((smtc / "eval" / "discovery" / sequence).glob("*.png"))
        assert len(pngs) == 32 and len(pairs) <= 4 and all(0 <= s < 4 and 0 <= p < 2 for s, p in pairs)
        assert max(int(read_mask(png).max()) for png in pngs) <= len(pairs)
    step = run_eval("discovery", "--ckpt", smtc / "checkpoints" / "step-000001", "--data", unsupervised_davis,
                    "--proposals", "4", "--device", "cpu", "--out", tmp_path / "step")
    assert step["scores"] == written["scores"]  # the run folder's export is its last checkpoint's
    features = run_eval("discovery", "--ckpt", smtc, "--data", unsupervised_davis, "--proposals-from", "features",
                        "--proposals", "4", "--device", "cpu", "--out", tmp_path / "features")
    assert features["proposals_from"] == "features"
    labelprop = run_eval("labelprop", "--ckpt", smtc, "--data", davis_dir, "--protocol", "smtc", "--context", "4",
                         "--device", "cpu", "--out", tmp_path / "labelprop")
    assert 0.0 <= labelprop["scores"]["J&F-Mean"] <= 1.0


@pytest.mark.parametrize("script", ["eval/run.py", "eval/davis_metrics.py", "eval/bench_label_prop.py"])
def test_entry_scripts_have_help(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "usage" in out.stdout


def test_labelprop_without_annotations_only_writes_masks(run_dir, tmp_path):
    from eval.davis_io import write_davis_folder
    import numpy as np

    frames = [np.full((32, 48, 3), 20 * t, np.uint8) for t in range(4)]
    first = np.zeros((32, 48), np.uint8)
    first[8:20, 8:30] = 1
    davis = write_davis_folder(tmp_path / "test-dev", {"clip": (frames, [first])})  # frame 0 annotated only
    args = ["--ckpt", run_dir, "--data", davis, "--out", tmp_path / "out", "--device", "cpu", "--short-side", "0"]
    with pytest.raises(ValueError, match="--no-score"):
        run_eval("labelprop", *args)
    result = run_eval("labelprop", *args, "--no-score")
    assert "scores" not in result and len(list((tmp_path / "out" / "clip").glob("*.png"))) == 4


def test_pixel_features_need_no_checkpoint_and_beat_nothing_by_construction(davis_dir, tmp_path):
    from eval.features import PixelCells
    frames = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).view(2, 3, 16, 24)
    cells = PixelCells()(frames)
    assert cells.shape == (2, 3 * 64, 2, 3)
    torch.testing.assert_close(cells[1, :, 1, 2].view(3, 8, 8), frames[1, :, 8:16, 16:24])
    result = run_eval("labelprop", "--features", "pixels", "--data", davis_dir, "--protocol", "crw",
                      "--context", "4", "--device", "cpu", "--out", tmp_path / "pix")
    assert result["ckpt"] == "pixels" and 0.2 < result["scores"]["J&F-Mean"] <= 1.0
    with pytest.raises(UsageError, match="--ckpt is required"):
        run_eval("labelprop", "--data", davis_dir, "--out", tmp_path / "none")  # no --ckpt, no pixels


def test_ckpt_accepts_a_checkpoint_folder(run_dir, davis_dir, tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-000004"
    export_backbone(models.io.load_backbone(run_dir / "backbone.safetensors"), step / "backbone.safetensors")
    args = ["labelprop", "--protocol", "crw", "--context", "2", "--device", "cpu", "--data", davis_dir]
    from_step = run_eval(*args, "--ckpt", step, "--out", tmp_path / "a")
    from_run = run_eval(*args, "--ckpt", run_dir, "--out", tmp_path / "b")
    assert from_step["scores"] == from_run["scores"]


@pytest.fixture(scope="module")
def dinov2_checkpoint(tmp_path_factory):
    """A random-weight ViT-S/14 with 4 registers in the official DINOv2 file layout and name."""
    from tests.models.dinov2_checkpoints import official_dinov2_state

    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official_dinov2_state("small", 4), path)
    return path


def test_dinov2_checkpoint_labelprop_and_clusters(dinov2_checkpoint, davis_dir, tmp_path):
    # 128x96 frames -> 126x84 inputs (multiples of 14): a 9 x 6 grid, or 18 x 12 cells upsampled x2.
    # One sequence (a ViT-S on the CPU): a subset list in a copy of the DAVIS folder.
    davis_dir = shutil.copytree(davis_dir, tmp_path / "davis")
    (davis_dir / "ImageSets" / "2017" / "one.txt").write_text("synth00\n")
    common = ["--ckpt", dinov2_checkpoint, "--data", davis_dir, "--set", "one", "--context", "4", "--device", "cpu"]
    stride14 = run_eval("labelprop", *common, "--protocol", "smtc", "--out", tmp_path / "s14")
    stride7 = run_eval("labelprop", *common, "--protocol", "smtc_upsampled", "--radius", "12",
                       "--out", tmp_path / "s7")
    for result, out in ((stride14, "s14"), (stride7, "s7")):
        assert 0.0 <= result["scores"]["J&F-Mean"] <= 1.0
        assert len(list((tmp_path / out / "synth00").glob("*.png"))) == 32 and not (tmp_path / out / "synth01").exists()
    assert stride7["config"]["upsample"] == 2 and stride14["config"]["upsample"] == 1
    assert stride7["scores"] != stride14["scores"]  # the finer grid propagates differently
    clusters = run_eval("clusters", "--ckpt", dinov2_checkpoint, "--data", davis_dir, "--set", "one",
                        "--granularity", "clip", "--clip-frames", "8", "--size", "112", "--eval-size", "32",
                        "--out", tmp_path / "c", "--device", "cpu")
    assert clusters["scores"]["units"] == 4 and 0.0 < clusters["scores"]["mIoU"] <= 1.0
    with pytest.raises(SystemExit, match="--size 100 is not a multiple of the backbone's patch size 14"):
        run_eval("clusters", "--ckpt", dinov2_checkpoint, "--data", davis_dir, "--size", "100",
                 "--out", tmp_path / "c", "--device", "cpu")
