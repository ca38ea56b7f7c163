"""NeCo: the loss, the permutation matrices and the student gradients against a transcription of the
reference (vpariza/NeCo at 3932160, src/neco.py ``NeCo.compute_knn_perm_mat``, ``compute_knn_subloss`` and
``knn_loss``; src/neco_transforms.py ``NeCoTransforms.calculate_bboxes``), and the objective's views,
gradient paths and teacher.

The transcription keeps the reference's data layout (flat crop-major embeddings, boxes in crop pixels
per (global crop, other crop) pair, the sample-major ROI-align of all pairs of a global crop) so that a
slip in our reshapes, box mapping or averaging shows. It calls diffsort, the package the reference calls.
"""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffsort import DiffSortNet
from torchvision.ops import roi_align

from train.objectives import OBJECTIVES
from train.objectives.neco import (NeCoConfig, draw_references, multicrop_neco_loss, neco_loss, overlap_boxes,
                                   pairwise_distances, soft_permutations)

F64 = torch.float64


# ---------------------------------------------------------------- the transcription


def ref_calculate_bboxes(crop_boxes, size_crops, nmb_crops):
    """NeCoTransforms.calculate_bboxes: (V, 4) absolute boxes -> gc (G, V, 4) and all (V, G, 4) in crop pixels."""
    G = nmb_crops[0]
    gc = crop_boxes[:G]
    left_top = torch.max(gc[:, None, :2], crop_boxes[:, :2])
    right_bottom = torch.min(gc[:, None, 2:], crop_boxes[:, 2:])
    assert torch.all((right_bottom - left_top) > 0)
    ws_hs = torch.stack((crop_boxes[:, 2] - crop_boxes[:, 0], crop_boxes[:, 3] - crop_boxes[:, 1])).T[:, None]
    sizes = torch.cat([torch.full((nmb_crops[0], 2), float(size_crops[0])),
                       torch.full((nmb_crops[1], 2), float(size_crops[1]))])[:, None].to(crop_boxes.dtype)
    x1y1 = crop_boxes[:, None, :2]
    lt_gc = sizes[:G] * ((left_top - x1y1[:G]) / ws_hs[:G])
    rb_gc = sizes[:G] * ((right_bottom - x1y1[:G]) / ws_hs[:G])
    lt_other = torch.stack([left_top[i] for i in range(G)], dim=1)
    rb_other = torch.stack([right_bottom[i] for i in range(G)], dim=1)
    lt_otc = sizes * ((lt_other - x1y1) / ws_hs)
    rb_otc = sizes * ((rb_other - x1y1) / ws_hs)
    return torch.cat((lt_gc, rb_gc), dim=2), torch.cat((lt_otc, rb_otc), dim=2)


def ref_perm_mat(src_map, tgt_map, sorter, sim_dist):
    """compute_knn_perm_mat: maps (bs, d, ps, ps) -> (bs, ps*ps [rank], ps*ps [reference], ps, ps)."""
    bs, d, ps, _ = src_map.shape
    src = src_map.permute(0, 2, 3, 1).reshape(bs, ps * ps, d)
    tgt = tgt_map.permute(0, 2, 3, 1).reshape(bs, ps * ps, d)
    if sim_dist == "euclidean":
        dist = torch.cdist(src, tgt, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary")
    else:
        dist = torch.einsum("bhc,bwc->bhw", F.normalize(src, dim=-1), F.normalize(tgt, dim=-1))
    _, perm = sorter(dist.reshape(-1, dist.shape[-1]))
    return perm.reshape(bs, ps, ps, ps * ps, ps * ps).permute(0, 4, 3, 1, 2)


def ref_subloss(q, p, thresholded_mask, crop_idx, n_total):
    """compute_knn_subloss."""
    if thresholded_mask is not None:
        mask = thresholded_mask[crop_idx::n_total].squeeze().float().unsqueeze(1)
        if torch.sum(mask).item() != 0:
            mask = torch.repeat_interleave(mask, q.shape[2], dim=1)
            return -torch.sum(torch.sum(q * torch.log(p), dim=1) * mask) / torch.sum(mask)
        return 0.0
    return -torch.mean(torch.sum(q * torch.log(p), dim=1))


def ref_knn_loss(gc_teacher, gc_student, lc_student, bboxes, bs, gc_res, lc_res, nmb_crops, patch_size, k,
                 student_sorter, teacher_sorter, sim_dist, attn_hard=None, queue=None):
    """knn_loss with crops_for_assign = range(G); queue: per global crop a full (Q, d) queue or None."""
    n_total = sum(nmb_crops)
    loss = 0
    for i, crop_id in enumerate(range(nmb_crops[0])):
        emb_gc = gc_teacher[bs * gc_res ** 2 * crop_id:bs * gc_res ** 2 * (crop_id + 1)]
        emb_gc_map = emb_gc.reshape(bs, gc_res, gc_res, -1).permute(0, 3, 1, 2)
        gc_boxes = torch.unbind(bboxes["gc"][:, crop_id] / patch_size)
        aligned_gc = roi_align(emb_gc_map, gc_boxes, k, aligned=True)
        thresholded = None
        if attn_hard is not None:
            aligned_mask = roi_align(attn_hard[bs * crop_id: bs * (crop_id + 1)], gc_boxes, k, aligned=True)
            thresholded = aligned_mask >= 1.0
        subloss = 0
        for v in np.delete(np.arange(n_total), crop_id):
            if v < nmb_crops[0]:
                out = gc_student[bs * gc_res ** 2 * v:bs * gc_res ** 2 * (v + 1)]
                res = gc_res
            else:
                lc = v - nmb_crops[0]
                out = lc_student[bs * lc_res ** 2 * lc:bs * lc_res ** 2 * (lc + 1)]
                res = lc_res
            aligned_out = roi_align(out.reshape(bs, res, res, -1).permute(0, 3, 1, 2),
                                    torch.unbind(bboxes["all"][:, v, crop_id].unsqueeze(1) / patch_size), k,
                                    aligned=True)
            sel = aligned_gc[v::n_total]
            bsl, d, ps1, ps2 = sel.shape
            n = bsl * ps1 * ps2
            if queue is not None:
                idces = torch.randperm(queue[i].shape[0])[:n] % queue[i].shape[0]
                tgt = queue[i][idces].reshape(bsl, ps1, ps2, d).permute(0, 3, 1, 2)
            else:
                filtered = sel.permute(0, 2, 3, 1).flatten(0, 2)
                repeats = round(n / filtered.shape[0]) + 1
                tgt = filtered.repeat(repeats, 1)[:n]
                tgt = tgt[torch.randperm(n)].reshape(bsl, ps1, ps2, d).permute(0, 3, 1, 2)
            p = ref_perm_mat(aligned_out, tgt, student_sorter, sim_dist)
            with torch.no_grad():
                q = ref_perm_mat(sel, tgt, teacher_sorter, sim_dist)
            subloss += ref_subloss(q, p, thresholded, v, n_total)
        loss += subloss / (n_total - 1)
    return loss / nmb_crops[0]


# ---------------------------------------------------------------- parity


def overlapping_boxes(seed, n, G, frame=(300, 200)):
    """(n, V, 4) integer crop boxes whose globals overlap every other crop (the pipeline's rule)."""
    from pipeline.params import draw
    from pipeline.views import MulticropViews

    spec = MulticropViews(frames=1, global_crops=G, local_crops=2, min_overlap=0.05, boxes=True)
    return torch.tensor(np.stack([draw(spec, np.random.default_rng(seed + i), *frame, 5, 0, 0)["box"]
                                  for i in range(n)]), dtype=F64)


SETUPS = {  # name: (sim_dist, sort_net, student steepness, teacher steepness, fg mask, queue)
    "recipe": ("cosine", "bitonic", 100.0, 100.0, False, False),
    "code_defaults": ("euclidean", "odd_even", 5.0, 20.0, False, False),
    "fg_queue": ("cosine", "bitonic", 30.0, 100.0, True, True),
}


def parity_inputs(seed=0, bs=3, G=2, gc_res=4, lc_res=2, patch=8, d=6):
    g = torch.Generator().manual_seed(seed)
    crop_boxes = overlapping_boxes(seed, bs, G)
    teacher = [F.normalize(torch.randn(bs, gc_res * gc_res, d, generator=g, dtype=F64), dim=-1) for _ in range(G)]
    student = [torch.randn(bs, r * r, d, generator=g, dtype=F64) for r in [gc_res] * G + [lc_res] * 2]
    fg = (torch.rand(G, bs, 1, gc_res, gc_res, generator=g) < 0.7).to(F64)
    queue = [torch.randn(64, d, generator=g, dtype=F64) for _ in range(G)]
    return crop_boxes, teacher, student, fg, queue, dict(bs=bs, G=G, gc_res=gc_res, lc_res=lc_res, patch=patch)


def both_losses(setup, k=3, seed=0, flip=None):
    sim, net, s_steep, t_steep, use_fg, use_queue = setup
    crop_boxes, teacher, student, fg, queue, dims = parity_inputs(seed)
    bs, G, gc_res, lc_res, patch = (dims[x] for x in ("bs", "G", "gc_res", "lc_res", "patch"))
    sizes = (gc_res * patch, lc_res * patch)
    s_sorter = DiffSortNet(net, k * k, steepness=s_steep)
    t_sorter = DiffSortNet(net, k * k, steepness=t_steep)

    # the reference: flat crop-major embeddings, per-sample boxes in crop pixels
    ref_student = [s.clone().requires_grad_() for s in student]
    per_sample = [ref_calculate_bboxes(b, sizes, (G, 2)) for b in crop_boxes]
    bboxes = {"gc": torch.stack([p[0] for p in per_sample]), "all": torch.stack([p[1] for p in per_sample])}
    torch.manual_seed(7)
    want = ref_knn_loss(torch.cat([t.flatten(0, 1) for t in teacher]),
                        torch.cat([s.flatten(0, 1) for s in ref_student[:G]]),
                        torch.cat([s.flatten(0, 1) for s in ref_student[G:]]), bboxes, bs, gc_res, lc_res,
                        (G, 2), patch, k, s_sorter, t_sorter, sim,
                        attn_hard=fg.flatten(0, 1) if use_fg else None, queue=queue if use_queue else None)
    want.backward()

    # ours: per-view maps, boxes in frame pixels
    ours = [s.clone().requires_grad_() for s in student]

    def as_map(x, r):
        return x.transpose(1, 2).unflatten(2, (r, r))

    kwargs = dict(roi_size=k, distance=sim, references="batch", student_sorter=s_sorter, teacher_sorter=t_sorter,
                  fg=fg if use_fg else None, queues=queue if use_queue else None)
    kwargs.update(flip or {})
    torch.manual_seed(7)
    got, _ = multicrop_neco_loss([as_map(t, gc_res) for t in teacher],
                                 [as_map(s, r) for s, r in zip(ours, [gc_res] * G + [lc_res] * 2)], crop_boxes,
                                 torch.zeros(bs, G + 2, dtype=torch.bool),
                                 [gc_res] * G + [lc_res] * 2, **kwargs)
    got.backward()
    return want, got, [s.grad for s in ref_student], [s.grad for s in ours]


@pytest.mark.parametrize("name", list(SETUPS))
def test_loss_and_student_gradients_equal_the_reference(name):
    want, got, want_grads, got_grads = both_losses(SETUPS[name])
    assert want.dtype == got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for a, b in zip(got_grads, want_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("name,flip", [
    ("recipe", {"distance": "euclidean"}),                    # the other distance
    ("recipe", {"references": "other_images"}),              # the paper's references draw other patches
    ("code_defaults", {"student_sorter": DiffSortNet("odd_even", 9, steepness=20.0)}),  # steepness swapped
    ("code_defaults", {"teacher_sorter": DiffSortNet("bitonic", 9, steepness=20.0)}),   # other network
    ("fg_queue", {"fg": None}),                                # mask off
])
def test_a_flipped_switch_breaks_parity(name, flip):
    want, got, _, _ = both_losses(SETUPS[name], flip=flip)
    assert not torch.allclose(got, want, rtol=1e-5, atol=0)


def test_permutation_matrices_equal_the_reference_layout():
    """Ours (B, N query, M reference, M rank) against compute_knn_perm_mat's (bs, rank, reference, ps, ps)."""
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randn(2, 5, 3, 3, generator=g, dtype=F64), torch.randn(2, 5, 3, 3, generator=g, dtype=F64)
    sorter = DiffSortNet("bitonic", 9, steepness=10.0)
    want = ref_perm_mat(src, tgt, sorter, "cosine")
    ours = soft_permutations(pairwise_distances(src.flatten(2).transpose(1, 2), tgt.flatten(2).transpose(1, 2),
                                                "cosine"), sorter)
    assert ours.shape == (2, 9, 9, 9)
    torch.testing.assert_close(ours, want.flatten(3).permute(0, 3, 2, 1), rtol=1e-12, atol=1e-12)
    # a soft permutation: rows and columns sum to 1, and at high steepness it sorts the distances
    torch.testing.assert_close(ours.sum(-1), torch.ones(2, 9, 9, dtype=F64))
    torch.testing.assert_close(ours.sum(-2), torch.ones(2, 9, 9, dtype=F64))
    sharp = soft_permutations(torch.tensor([[[0.3, -0.5, 0.9, 0.1]]], dtype=F64), DiffSortNet("bitonic", 4, steepness=1e6))
    assert sharp[0, 0].argmax(-1).tolist() == [2, 0, 3, 1]  # value i -> its ascending rank


def test_overlap_boxes_equal_the_reference_crop_boxes_and_follow_flips():
    crop_boxes = overlapping_boxes(5, 4, 2)
    for b in crop_boxes:
        gc, other = ref_calculate_bboxes(b, (32, 16), (2, 2))
        for g in range(2):
            for v in range(4):
                ours_g = overlap_boxes(b[None], torch.zeros(1, 4, dtype=torch.bool), g, v, 32 / 8)[0]
                ours_v = overlap_boxes(b[None], torch.zeros(1, 4, dtype=torch.bool), v, g, (32 if v < 2 else 16) / 8)[0]
                torch.testing.assert_close(ours_g, gc[g, v] / 8)
                torch.testing.assert_close(ours_v, other[v, g] / 8)
    flips = torch.tensor([[True, False, False, False]])
    plain = overlap_boxes(crop_boxes[:1], ~flips, 0, 2, 4.0)[0]
    mirrored = overlap_boxes(crop_boxes[:1], flips, 0, 2, 4.0)[0]
    torch.testing.assert_close(mirrored, torch.stack([4 - plain[2], plain[1], 4 - plain[0], plain[3]]))


# ---------------------------------------------------------------- pieces


def test_loss_is_zero_only_for_identical_hard_permutations_and_masks_select_queries():
    eye = torch.eye(4, dtype=F64).expand(2, 3, 4, 4)
    assert neco_loss(eye, eye.clamp_min(1e-300)).abs() < 1e-12
    soft = torch.full((2, 3, 4, 4), 0.25, dtype=F64)
    torch.testing.assert_close(neco_loss(eye, soft), torch.tensor(np.log(4), dtype=F64))
    mixed = soft.clone()
    mixed[:, 0] = eye[:, 0].clamp_min(1e-300)  # query 0 matches the teacher exactly
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[:, 0] = True
    assert neco_loss(eye, mixed, mask).abs() < 1e-12 and neco_loss(eye, mixed) > 0.5
    assert neco_loss(eye, mixed, torch.zeros(2, 3, dtype=torch.bool)) == 0


def test_other_image_references_never_come_from_the_image_itself():
    B, N = 4, 9
    patches = torch.arange(B, dtype=F64)[:, None, None].expand(B, N, 3).clone()  # every patch holds its image id
    refs = draw_references(patches, "other_images")
    for b in range(B):
        assert (refs[b] != b).all() and len(torch.unique(refs[b, :, 0])) > 1
    code = draw_references(patches, "batch")
    assert sorted(code[..., 0].flatten().tolist()) == sorted(patches[..., 0].flatten().tolist())
    mask = torch.zeros(B, N, dtype=torch.bool)
    assert draw_references(patches, "batch", mask) is None


# ---------------------------------------------------------------- the objective

TINY = NeCoConfig(proj_dim=8, proj_hidden_dim=16, global_size=32, local_size=16, local_crops=2, roi_size=3,
                  grad_checkpointing=False)


def build(cfg=TINY, total_steps=10):
    torch.manual_seed(0)
    return OBJECTIVES["neco"](cfg, arch="vit_tiny_patch16", total_steps=total_steps, steps_per_epoch=5)


def batch_of(cfg=TINY, B=3, seed=0, frames=1):
    g = torch.Generator().manual_seed(seed)
    boxes = overlapping_boxes(seed, B, cfg.global_crops).float()[:, :cfg.global_crops + cfg.local_crops]
    return {"global": torch.randn(B, cfg.global_crops, frames, 3, cfg.global_size, cfg.global_size, generator=g),
            "local": torch.randn(B, cfg.local_crops, frames, 3, cfg.local_size, cfg.local_size, generator=g),
            "boxes": boxes, "flip": torch.zeros(B, cfg.global_crops + cfg.local_crops, dtype=torch.bool)}


def test_views_ask_for_overlapping_multicrop_boxes():
    spec = build().views()
    assert spec.family == "multicrop" and spec.boxes and spec.min_overlap == 0.01 and not spec.flip
    assert (spec.global_crops, spec.local_crops, spec.frames) == (2, 2, 1)
    video = build(dataclasses.replace(TINY, frames=2, frame_stride=7)).views()
    assert (video.frames, video.stride) == (2, 7)


def test_views_draw_the_reference_colours():
    """NeCoTransforms: ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2, blur sigma 0.1-2 with p 0.5
    on every crop, never a solarize (DINO's recipe blurs its first global crop always and solarizes the second)."""
    from pipeline.params import draw

    spec = build().views()
    color = np.stack([draw(spec, np.random.default_rng(seed), 64, 48, 1, 0, 0)["color"][:, 0] for seed in range(2000)])
    jittered = color[..., 0] != 1.0
    assert np.abs(jittered.mean(0) - 0.8).max() < 0.04 and np.abs(color[..., 4].mean(0) - 0.2).max() < 0.04
    assert color[..., 0].min() >= 0.2 and color[..., 0].max() <= 1.8 and np.abs(color[..., 3]).max() <= 0.2
    assert np.abs((color[..., 5] > 0).mean(0) - 0.5).max() < 0.04
    assert (color[..., 6] == 0).all()


def test_student_and_head_get_gradients_the_teacher_none_and_the_teacher_follows():
    obj = build()
    loss, logs = obj(batch_of())
    assert torch.isfinite(loss) and loss > 0 and {"teacher_rank_entropy", "feature_std"} <= set(logs)
    loss.backward()
    assert obj.student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert obj.student_head.mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in obj.teacher.parameters())
    before = obj.teacher.net.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        obj.student.blocks[0].attn.qkv.weight.add_(1.0)
    obj.after_step(0)
    moved = obj.teacher.net.blocks[0].attn.qkv.weight - before
    torch.testing.assert_close(moved, torch.full_like(moved, 1 - obj.momentum(0)))
    assert obj.momentum(0) == pytest.approx(0.9995) and obj.momentum(10) == pytest.approx(1.0)


def test_loss_falls_on_a_fixed_batch():
    obj = build(dataclasses.replace(TINY, student_steepness=10.0, teacher_steepness=10.0))
    batch = batch_of()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        torch.manual_seed(1)  # the same references every step
        loss, _ = obj(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mask", ["fg", "bg"])
def test_masked_losses_and_the_queue_run(mask):
    obj = build(dataclasses.replace(TINY, loss_mask=mask, queue_size=32))
    loss, logs = obj(batch_of())
    loss.backward()
    assert torch.isfinite(loss) and 0 <= logs["mask_fraction"] <= 1
    assert all(int(q.count) > 0 for q in obj.queues)


def test_video_variant_reads_each_view_from_its_frame():
    obj = build(dataclasses.replace(TINY, frames=2))
    batch = batch_of(frames=2)
    loss, _ = obj(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["global"][:, 0, 1] += 1.0  # frame 1 of global crop 0: unused (global 0 reads frame 0)
    torch.manual_seed(0)
    obj2 = build(dataclasses.replace(TINY, frames=2))
    torch.manual_seed(5)
    a, _ = obj2(batch)
    torch.manual_seed(5)
    b, _ = obj2(changed)
    torch.testing.assert_close(a, b)
    changed["global"][:, 1, 1] += 1.0  # frame 1 of global crop 1: read
    torch.manual_seed(5)
    c, _ = obj2(changed)
    assert not torch.allclose(a, c)
