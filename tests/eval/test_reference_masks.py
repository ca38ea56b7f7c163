"""Whole label-propagation runs against masks that the reference scripts themselves wrote, once.

The fixture (tests/eval/fixtures/reference-propagation/): frames 0-9 of DAVIS-2016 car-shadow (CC BY 4.0,
Perazzi et al., CVPR 2016) downscaled to 214x120 (JPEG quality 92), the car's mask split at column 127
into two objects (ids 1 and 2), and the masks written by
* ``reference/dino``: facebookresearch/dino ``eval_video_segmentation.py`` (commit 7c446df), ``--arch
  vit_tiny --patch_size 16`` and its defaults, on ``reference_weights.dino_vit_tiny16_state(0)``;
* ``reference/crw``: ajabri/videowalk ``code/test.py`` then ``code/eval/convert_davis.py`` (commit 047f3f4)
  with the README's DAVIS arguments (``--topk 10 --videoLen 20 --radius 12 --temperature 0.05
  --cropSize -1``, ``--model-type scratch``), on ``reference_weights.crw_checkpoint(0)``.
Both ran on a CPU (``.cuda()`` made a no-op, the palette download replaced by the VOC palette) with torch
2.14.1 and opencv 5.1.0 on 2026-12-07; docs/design.md ("Presets against the reference scripts") has the
harness and the same comparison on full-size DAVIS sequences.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import run as eval_run
from eval.davis_io import read_mask
from tests.eval.reference_weights import crw_checkpoint, dino_vit_tiny16_state

FIXTURE = Path(__file__).parent / "fixtures" / "reference-propagation"
SEQUENCE = "car-shadow-small"


@pytest.mark.slow
@pytest.mark.parametrize("protocol, checkpoint", [("dino", dino_vit_tiny16_state), ("crw", crw_checkpoint)])
def test_protocol_reproduces_the_reference_scripts_masks(protocol, checkpoint, tmp_path):
    weights = tmp_path / f"{protocol}.pth"
    torch.save(checkpoint(0), weights)
    code = eval_run.run_from_command_line(["labelprop", "--ckpt", str(weights), "--data", str(FIXTURE / "davis"),
                                           "--protocol", protocol, "--device", "cpu", "--out", str(tmp_path / "out")])
    assert code == 0
    reference = sorted((FIXTURE / "reference" / protocol / SEQUENCE).glob("*.png"))
    assert len(reference) == 10
    agreement = []
    for path in reference[1:]:  # frame 0 is the ground truth in both
        ours, theirs = read_mask(tmp_path / "out" / SEQUENCE / path.name), read_mask(path)
        assert ours.shape == theirs.shape == (120, 214)
        agreement.append(float((ours == theirs).mean()))
        assert set(np.unique(theirs)) <= {0, 1, 2}
    # Identical on the machine that wrote the fixture; the margin is for another CPU's float summation order
    # (a near-tie in a top-k can flip a cell). A preprocessing step done differently moves far more pixels.
    assert min(agreement) >= 0.999 and np.mean(agreement) >= 0.9995, agreement
