"""Object discovery: official per-sequence matching vs the lenient per-frame variant; proposals."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval import discovery
from eval.davis_io import Sequence


def swapping_video(frames=4):
    """Two GT objects; the prediction finds both but swaps their ids halfway through."""
    gt = np.zeros((frames, 32, 32), np.uint8)
    gt[:, 2:12, 2:12] = 1
    gt[:, 18:30, 18:30] = 2
    pred = gt.copy()
    pred[frames // 2:] = np.where(gt[frames // 2:] == 1, 2, np.where(gt[frames // 2:] == 2, 1, 0))
    return gt, pred


def test_official_protocol_requires_consistent_ids():
    gt, pred = swapping_video()
    scores, assignment = discovery.score_unsupervised("seq", gt, pred)
    # one matching for the whole sequence: each object is right in half the frames, wrong in the other half
    assert scores.j.mean() == pytest.approx(0.5)
    lenient = discovery.score_lenient_per_frame("seq", gt, pred)
    assert lenient.j.mean() == pytest.approx(1.0)  # per-frame matching forgives the swap


def test_lenient_variant_accepts_more_than_20_proposals_official_does_not():
    gt, _ = swapping_video()
    pred = (np.arange(32 * 32).reshape(32, 32) // 40 + 1).astype(np.uint8)[None].repeat(4, 0)  # 26 ids
    with pytest.raises(ValueError, match="at most 20"):
        discovery.score_unsupervised("seq", gt, pred)
    assert discovery.score_lenient_per_frame("seq", gt, pred).j.shape == (2, 4)


def test_feature_proposals_are_consistent_over_time():
    """Features that identify three regions give three proposals with the same ids in every frame."""
    regions = np.zeros((8, 8), np.int64)
    regions[:, 4:] = 1
    regions[5:, :] = 2
    codes = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    features = [codes[torch.from_numpy(regions)].permute(2, 0, 1) + 0.01 * torch.randn(16, 8, 8)
                for _ in range(3)]
    proposals = discovery.proposals_from_features(features, 3, (32, 32))
    assert proposals.shape == (3, 32, 32) and set(np.unique(proposals)) == {1, 2, 3}
    assert (proposals == proposals[0]).all()
    upsampled = np.kron(regions, np.ones((4, 4), np.int64))
    for region in range(3):  # each region is exactly one proposal
        assert len(np.unique(proposals[0][upsampled == region])) == 1


def test_evaluate_discovery_reads_results_folder(tmp_path):
    gt, pred = swapping_video()
    from eval.davis_io import write_mask
    encode = []
    for t in range(len(gt)):
        path = tmp_path / "gt" / f"{t:05d}.png"
        write_mask(path, gt[t])
        encode.append(path)
        write_mask(tmp_path / "res" / "seq" / f"{t:05d}.png", pred[t])
    sequence = Sequence("seq", tuple(encode), tuple(p.stem for p in encode), {p.stem: p for p in encode})
    official = discovery.evaluate_discovery([sequence], tmp_path / "res")
    lenient = discovery.evaluate_discovery([sequence], tmp_path / "res", lenient_per_frame=True)
    assert official[0].j.mean() == pytest.approx(0.5) and lenient[0].j.mean() == pytest.approx(1.0)


def crafted_slot_outputs():
    """Two frames on a 2 x 4 grid, 2 semantic slots x 2 instances. Slot 1 owns grid column 0, slot 0 the
    rest; inside slot 0, instance 1 owns columns 1-2 and instance 0 column 3. Slot 1's instances are
    invalid (cosine 0 and -1 with their slot); instance (0, 0) is valid in frame 0 only."""
    big = 20.0
    columns = torch.arange(8) % 4
    semantic_logits = torch.where(columns == 0, torch.tensor([[-big], [big]]), torch.tensor([[big], [-big]]))
    instance_logits = torch.zeros(2, 2, 8)
    instance_logits[0] = torch.where(columns == 3, torch.tensor([[big], [-big]]), torch.tensor([[-big], [big]]))
    e = torch.eye(3)
    semantic_slots = torch.stack([e[0], e[1]])
    instance_slots = torch.stack([torch.stack([e[0] + 0.1 * e[2], e[0]]), torch.stack([e[2], -e[1]])])
    outputs = {"semantic_logits": semantic_logits.expand(2, -1, -1),
               "instance_logits": instance_logits.expand(2, -1, -1, -1),
               "semantic_slots": semantic_slots.expand(2, -1, -1), "instance_slots": instance_slots.repeat(2, 1, 1, 1)}
    outputs["instance_slots"][1, 0, 0] = -e[0]  # instance (0, 0) is not part of its slot in frame 1
    return outputs


def test_slot_proposals_from_crafted_outputs():
    outputs = crafted_slot_outputs()
    masks, valid = discovery.slot_candidates(outputs["semantic_logits"], outputs["instance_logits"],
                                             outputs["semantic_slots"], outputs["instance_slots"])
    assert valid.tolist() == [[True, True, False, False], [False, True, False, False]]
    maps, pairs = discovery.proposals_from_slots(outputs, (2, 4), 3, (4, 8))
    # two candidates are ever valid; the larger (4 cells in 2 frames, against 2 cells in 1) is id 1
    assert pairs == [(0, 1), (0, 0)]
    # x2 bilinear: pixel columns 0-1 straddle slot 1's column (below 0.3 of the range: background)
    assert (maps[0] == np.array([0, 0, 1, 1, 1, 1, 2, 2])).all()
    assert (maps[1] == np.array([0, 0, 1, 1, 1, 1, 0, 0])).all()  # id 2 is invalid in frame 1: background
    single, pairs = discovery.proposals_from_slots(outputs, (2, 4), 1, (4, 8))
    assert pairs == [(0, 1)] and (single == np.array([0, 0, 1, 1, 1, 1, 0, 0])).all()
    assigned, _ = discovery.proposals_from_slots(outputs, (2, 4), 3, (4, 8), threshold=0.0)
    assert (assigned[0] == np.array([1, 1, 1, 1, 1, 1, 2, 2])).all()  # no threshold: any positive mask wins
    with pytest.raises(ValueError, match="1..20"):
        discovery.select_by_area(masks, valid, 21)
