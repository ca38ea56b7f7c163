"""SelfPatch: neighbour choice on hand-built grids, the aggregation head, the patch loss by hand and
against a loop-style transcription of the reference loss, gradients, and learning on a fixed batch."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models.selfpatch_head import SelfPatchHead, most_similar_neighbours, neighbour_table
from train.objectives import OBJECTIVES
from train.objectives.dino import update_center_
from train.objectives.selfpatch import SelfPatchConfig, patch_loss, selfpatch_loss

TINY = SelfPatchConfig(out_dim=64, patch_out_dim=32, head_hidden_dim=32, head_bottleneck_dim=16, global_size=64,
                       local_size=48, local_crops=2, freeze_last_layer_epochs=0)


def build(cfg=TINY):
    torch.manual_seed(0)
    return OBJECTIVES["selfpatch"](cfg, arch="vit_tiny_patch16", total_steps=10, steps_per_epoch=5)


def batch(b=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {"global": torch.randn(b, 2, 1, 3, 64, 64, generator=g),
            "local": torch.randn(b, 2, 1, 3, 48, 48, generator=g)}


# ---- neighbour choice -------------------------------------------------------------------------

def angle_tokens(angles: list[list[float]]) -> torch.Tensor:
    """(1, h*w, 2) unit vectors at the given angles (degrees): cosine similarity falls with the
    angle difference, so the most similar neighbours are the closest angles."""
    a = torch.tensor(angles, dtype=torch.float64).flatten() * math.pi / 180
    return torch.stack([a.cos(), a.sin()], -1)[None]


# 4x4 grid. Patch 0 (corner) is 0 degrees; the patches across the borders from it (3, 12, 15, 7,
# 13) are nearly 0 as well; its real neighbours 1, 4, 5 are at 30, 40, 50.
GRID = [[0, 30, 80, 2],
        [40, 50, 90, 6],
        [100, 110, 120, 130],
        [1, 4, 140, 3]]


def test_wrapped_corner_picks_the_patches_across_the_borders():
    chosen, valid = most_similar_neighbours(angle_tokens(GRID), (4, 4), k=4, wrap=True)
    assert valid.all()
    assert chosen[0, 0].tolist() == [12, 3, 15, 13]  # 1, 2, 3, 4 degrees: all across a border


def test_masked_corner_keeps_its_three_real_neighbours_and_marks_the_filler():
    chosen, valid = most_similar_neighbours(angle_tokens(GRID), (4, 4), k=4, wrap=False)
    assert chosen[0, 0, :3].tolist() == [1, 4, 5] and valid[0, 0].tolist() == [True, True, True, False]


def test_edges_and_interior():
    tokens = angle_tokens(GRID)
    # patch 1 (top edge, 30 degrees): real neighbours 0, 2, 4, 5, 6 at 0, 80, 40, 50, 90
    chosen, valid = most_similar_neighbours(tokens, (4, 4), k=4, wrap=False)
    assert chosen[0, 1].tolist() == [4, 5, 0, 2] and valid[0, 1].all()
    # wrapped, patch 1 also sees 12, 13, 14 (1, 4, 140 degrees): 40 and 50 are 10 and 20 away, 4 is 26, 1 is 29
    chosen, _ = most_similar_neighbours(tokens, (4, 4), k=4, wrap=True)
    assert chosen[0, 1].tolist() == [4, 5, 13, 12]
    # interior patch 5 (50 degrees) has the same 8 neighbours either way: 40, 30, 80, 0 ... closest first
    for wrap in (True, False):
        chosen, valid = most_similar_neighbours(tokens, (4, 4), k=4, wrap=wrap)
        assert chosen[0, 5].tolist() == [4, 1, 2, 6] and valid[0, 5].all()


def test_masked_edge_and_corner_counts_on_a_non_square_grid():
    _, valid = most_similar_neighbours(torch.randn(3, 20, 8), (4, 5), k=6, wrap=False)
    counts = valid.sum(-1).view(3, 4, 5)
    assert (counts[:, 0, 0] == 3).all() and (counts[:, 0, 2] == 5).all() and (counts[:, 2, 2] == 6).all()


def test_neighbour_table_matches_a_loop_transcription_of_the_reference():
    """SelfPatch's get_local_index: row/col indicator vectors marked (i +- j) % side, their outer
    product, the patch itself zeroed, nonzero indices ascending."""
    side = 6
    rows = []
    for i in range(side * side):
        ix, iy = divmod(i, side)
        wx, wy = torch.zeros(side), torch.zeros(side)
        wx[ix] = wy[iy] = 1
        wx[(ix + 1) % side] = wx[(ix - 1) % side] = 1
        wy[(iy + 1) % side] = wy[(iy - 1) % side] = 1
        weight = (wy[None] * wx[:, None]).flatten()
        weight[i] = 0
        rows.append(weight.nonzero().squeeze(1))
    index, _ = neighbour_table((side, side), 3, wrap=True)
    assert torch.equal(index, torch.stack(rows))


# ---- aggregation head -------------------------------------------------------------------------

def test_head_shapes_student_and_teacher():
    torch.manual_seed(0)
    head = SelfPatchHead(dim=24, num_heads=3, k_num=4, wrap=False)
    x = torch.randn(2, 20, 24)
    assert head(x).shape == (2, 21, 24)
    assert head(x, local=True, grid=(4, 5)).shape == (2, 21, 24)
    torch.testing.assert_close(head(x)[:, 1:], head.norm(x))  # the student's patches are LN(tokens)
    with pytest.raises(ValueError, match="not a square grid"):
        head(x, local=True)


def test_masked_head_ignores_the_filler_picks():
    """A corner has 3 real neighbours: with k = 4 its summary must equal the summary of exactly those
    3, and must not move when the filler token (whatever it is) changes."""
    torch.manual_seed(0)
    head = SelfPatchHead(dim=24, num_heads=3, k_num=4, wrap=False)
    x = torch.randn(1, 16, 24)
    out = head(x, local=True, grid=(4, 4))
    chosen, valid = most_similar_neighbours(x, (4, 4), 4, wrap=False)
    real = chosen[0, 0][valid[0, 0]]
    assert sorted(real.tolist()) == [1, 4, 5]
    alone = head.summarise(x[:, real], head.cls_token)
    torch.testing.assert_close(out[0, 1], head.norm(alone)[0, 0], atol=1e-6, rtol=1e-5)
    # The filler pick of the corner is some other token: scale every non-neighbour and the corner itself
    moved = x.clone()
    others = [p for p in range(16) if p not in (1, 4, 5)]
    moved[0, others] *= 3.0
    torch.testing.assert_close(head(moved, local=True, grid=(4, 4))[0, 1], out[0, 1], atol=1e-6, rtol=1e-5)
    # Wrapped, the corner reads across the borders instead: its summary differs
    head.wrap = True
    assert not torch.allclose(head(x, local=True, grid=(4, 4))[0, 1], out[0, 1], atol=1e-4)


# ---- the loss ---------------------------------------------------------------------------------

def test_patch_loss_by_hand():
    s = torch.tensor([[[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]]], dtype=torch.float64)  # (V=1, B=1, N=2, D=3)
    q = torch.tensor([[[[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]]], dtype=torch.float64)
    tau = 0.5
    expected = 0.0
    for n in range(2):
        logits = [v / tau for v in s[0, 0, n].tolist()]
        log_z = math.log(sum(math.exp(v) for v in logits))
        expected += -sum(p * (v - log_z) for p, v in zip(q[0, 0, n].tolist(), logits)) / 2
    got = patch_loss(s, q, tau)
    assert got.shape == (1,) and got.item() == pytest.approx(expected, rel=1e-12)


def test_zero_student_gives_ln_d_plus_a_tenth_of_ln_dp():
    """objectives spec §7.8: 11.9221315 for 65536 / 4096; here 128 / 64 -> 5.2679186."""
    g = torch.Generator().manual_seed(0)
    loss, cls_loss, patch_term = selfpatch_loss(
        torch.zeros(4, 2, 128), torch.randn(2, 2, 128, generator=g),
        [torch.zeros(2, 2, 9, 64), torch.zeros(2, 2, 4, 64)],
        [torch.randn(2, 2, 9, 64, generator=g), torch.randn(2, 2, 4, 64, generator=g)],
        torch.zeros(1, 128), torch.zeros(1, 64), 0.04)
    assert cls_loss.item() == pytest.approx(math.log(128), rel=1e-6)
    assert patch_term.item() == pytest.approx(math.log(64), rel=1e-6)
    assert loss.item() == pytest.approx(5.2679186, rel=1e-6)


class ReferencePatchDINOLoss:
    """Loop-style transcription of SelfPatch's DINOLoss (objectives spec §5.a): outputs as
    [[cls (2B, 1, D), patches (2B, N_g, D_p)], [cls (LB, 1, D), patches (LB, N_l, D_p)]], chunked into
    crops; CLS pairs iq in {0, 1} x v != iq, patch terms v == iq over all crops; centers (1, 1, D)
    from the teacher CLS of all crops and (1, D_p) from every teacher patch row."""

    def __init__(self, out_dim, patch_dim, ncrops, temp, student_temp=0.1, momentum=0.9):
        self.center = torch.zeros(1, 1, out_dim, dtype=torch.float64)
        self.patch_center = torch.zeros(1, patch_dim, dtype=torch.float64)
        self.ncrops, self.temp, self.student_temp, self.momentum = ncrops, temp, student_temp, momentum

    def __call__(self, student_output, teacher_output):
        def crops(output, part):
            return list(output[0][part].chunk(2)) + list(output[1][part].chunk(self.ncrops - 2))
        s_cls, s_pat, t_cls, t_pat = crops(student_output, 0), crops(student_output, 1), crops(teacher_output, 0), \
            crops(teacher_output, 1)
        c_loss = p_loss = 0.0
        n_cls = n_pat = 0
        for iq in range(self.ncrops):
            q_cls = F.softmax((t_cls[iq] - self.center) / self.temp, dim=-1)
            for v in range(self.ncrops):
                if v == iq:
                    q_pat = F.softmax((t_pat[iq] - self.patch_center) / self.temp, dim=-1)
                    term = torch.sum(-q_pat * F.log_softmax(s_pat[v] / self.student_temp, dim=-1), dim=-1)
                    p_loss, n_pat = p_loss + term.mean(), n_pat + 1
                elif iq <= 1:
                    term = torch.sum(-q_cls * F.log_softmax(s_cls[v] / self.student_temp, dim=-1), dim=-1)
                    c_loss, n_cls = c_loss + term.mean(), n_cls + 1
        c_loss, p_loss = c_loss / n_cls, p_loss / n_pat
        all_cls = torch.cat(t_cls)
        self.center = self.center * self.momentum + all_cls.sum(0, keepdim=True) / len(all_cls) * (1 - self.momentum)
        rows = sum(t.shape[0] * t.shape[1] for t in t_pat)
        patch_sum = sum(t.sum(1).sum(0, keepdim=True) for t in t_pat)
        self.patch_center = self.patch_center * self.momentum + patch_sum / rows * (1 - self.momentum)
        return c_loss + 0.1 * p_loss, c_loss, p_loss


def test_loss_and_centers_equal_the_reference_transcription():
    """objectives spec §7.5: D 128, D_p 64, 2 global + 8 local crops, B 2; two steps so the centers
    the second step reads are the ones the first wrote."""
    torch.manual_seed(0)
    b, d, dp, locals_, tau = 2, 128, 64, 8, 0.04
    reference = ReferencePatchDINOLoss(d, dp, 2 + locals_, tau)
    center, patch_center = torch.zeros(1, d, dtype=torch.float64), torch.zeros(1, dp, dtype=torch.float64)
    cfg = dataclasses.replace(TINY, cls_center_over_all_crops=True)
    for _ in range(2):
        def outputs():
            return [[torch.randn(2 * b, 1, d, dtype=torch.float64), torch.randn(2 * b, 196, dp, dtype=torch.float64)],
                    [torch.randn(locals_ * b, 1, d, dtype=torch.float64),
                     torch.randn(locals_ * b, 36, dp, dtype=torch.float64)]]
        student, teacher = outputs(), outputs()
        student[0][0].requires_grad_(True)
        student[1][1].requires_grad_(True)
        ref_loss, ref_cls, ref_patch = reference(student, teacher)

        def view_major(x):  # (views*B, ...) crop-major rows -> (views, B, ...)
            return x.unflatten(0, (-1, b))
        s_cls = torch.cat([view_major(student[0][0][:, 0]), view_major(student[1][0][:, 0])])
        t_cls = [view_major(teacher[0][0][:, 0]), view_major(teacher[1][0][:, 0])]
        s_pat = [view_major(student[0][1]), view_major(student[1][1])]
        t_pat = [view_major(teacher[0][1]), view_major(teacher[1][1])]
        loss, cls_loss, patch_term = selfpatch_loss(s_cls, t_cls[0], s_pat, t_pat, center, patch_center, tau,
                                                    0.1, cfg.patch_loss_weight)
        for ours, theirs in [(loss, ref_loss), (cls_loss, ref_cls), (patch_term, ref_patch)]:
            assert ours.dtype == torch.float64
            assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
        grads = torch.autograd.grad(loss, [student[0][0], student[1][1]])
        ref_grads = torch.autograd.grad(ref_loss, [student[0][0], student[1][1]])
        for ours, theirs in zip(grads, ref_grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-12)
        update_center_(center, t_cls if cfg.cls_center_over_all_crops else t_cls[:1], cfg.center_momentum)
        update_center_(patch_center, t_pat, cfg.center_momentum)
        torch.testing.assert_close(center, reference.center[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(patch_center, reference.patch_center, rtol=1e-10, atol=1e-12)


def test_objective_centers_follow_the_switch():
    """cls_center_over_all_crops false (DINO) averages the global crops' CLS only; the patch center
    always averages every teacher patch row of every crop."""
    for over_all in (False, True):
        objective = build(dataclasses.replace(TINY, cls_center_over_all_crops=over_all))
        g = torch.Generator().manual_seed(0)
        cls = [torch.randn(2, 3, 64, generator=g), torch.randn(2, 3, 64, generator=g)]
        patches = [torch.randn(2, 3, 16, 32, generator=g), torch.randn(2, 3, 9, 32, generator=g)]
        objective.update_centers(cls, patches)
        rows = torch.cat([cls[0].flatten(0, 1), cls[1].flatten(0, 1)]) if over_all else cls[0].flatten(0, 1)
        torch.testing.assert_close(objective.center, 0.1 * rows.mean(0, keepdim=True))
        patch_rows = torch.cat([p.flatten(0, 2) for p in patches])
        torch.testing.assert_close(objective.patch_center, 0.1 * patch_rows.mean(0, keepdim=True))


# ---- the objective ----------------------------------------------------------------------------

def test_backbone_has_no_cls_token_and_no_final_norm():
    objective = build()
    for net in (objective.student, objective.backbone()):
        assert net.cls_token is None and isinstance(net.norm, torch.nn.Identity)
    assert set(dict(objective.student_head.named_children())) == {"ca_head", "c_head", "p_head"}
    with pytest.raises(ValueError, match="needs a ViT"):
        OBJECTIVES["selfpatch"](TINY, arch="resnet18_crw", total_steps=1, steps_per_epoch=1)
    with pytest.raises(ValueError, match="selfpatch.local_size 32 gives a grid under 3x3"):
        build(dataclasses.replace(TINY, local_size=32, neighbour_wraparound=True))


def test_gradients_reach_the_student_only():
    objective = build()
    objective.begin_step(0)
    loss, _ = objective(batch())
    loss.backward()
    teacher = list(objective.teacher.parameters()) + list(objective.teacher_head.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    student = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    assert student and all(p.grad is not None for _, p in student), [n for n, p in student if p.grad is None]


def test_loss_falls_on_a_fixed_batch_and_teacher_follows():
    objective = build()
    before = [p.clone() for p in objective.teacher_head.parameters()]
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    losses, patch_losses = [], []
    fixed = batch()
    for step in range(6):
        objective.begin_step(step)
        loss, logs = objective(fixed)
        opt.zero_grad()
        loss.backward()
        objective.before_optimizer_step(step)
        opt.step()
        objective.after_step(step)
        losses.append(loss.item())
        patch_losses.append(logs["patch_loss"].item())
    assert losses[-1] < losses[0] and patch_losses[-1] < patch_losses[0]
    assert {"cls_loss", "patch_loss", "teacher_entropy", "teacher_patch_entropy", "feature_std"} <= set(logs)
    assert 0 <= logs["teacher_patch_entropy"] <= math.log(32) + 1e-5
    assert any(not torch.equal(a, b) for a, b in zip(before, objective.teacher_head.parameters()))


def test_both_last_layers_frozen_in_the_first_epoch():
    objective = build(dataclasses.replace(TINY, freeze_last_layer_epochs=1))
    loss, _ = objective(batch())
    loss.backward()
    objective.before_optimizer_step(4)
    heads = objective.student_head
    assert all(p.grad is None for h in (heads.c_head, heads.p_head) for p in h.last_layer.parameters())
    assert heads.p_head.mlp[0].weight.grad is not None and heads.c_head.mlp[0].weight.grad is not None
