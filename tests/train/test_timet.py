"""TimeT: the feature forwarder against its dense definition, the loss against a loop-style
transcription of the reference `TimeT.get_loss` (objectives spec §2.a, §7.2), and the objective's
gradient paths, ViT passes, teacher updates and queue."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.train.test_objectives import fit
from train.finetune import freeze_backbone
from train.objectives import OBJECTIVES
from train.objectives.timet import TimeTConfig, feature_forwarder, timet_loss, window_mask
from train.teacher import EMATeacher

TINY = TimeTConfig(num_prototypes=8, head_dims=(16, 8), size=48, clip_len=4, frame_stride=1, ff_topk=3)


def build(cfg=TINY, arch="vit_tiny_patch16", total_steps=10):
    torch.manual_seed(0)
    return OBJECTIVES["timet"](cfg, arch=arch, total_steps=total_steps, steps_per_epoch=5)


def clips(b=2, t=4, size=48, seed=1):
    return {"clip": torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))}


# ---------------------------------------------------------------- feature forwarder


def test_window_mask_is_a_square_of_the_given_radius():
    mask = window_mask((14, 14), 6)
    assert mask.sum(1)[0] == 7 * 7 and mask.sum(1)[7 * 14 + 7] == 13 * 13  # corner vs centre cell
    assert torch.equal(mask, mask.T)
    assert window_mask((2, 3), 0).equal(torch.eye(6, dtype=torch.bool))


def dense_forwarder(features, source, grid, context, radius, topk, tau):
    """The definition, one target cell at a time: weights over every (context frame, cell) pair."""
    batch, frames, cells, _ = features.shape
    h, w = grid
    out = torch.zeros(batch, frames - 1, cells, source.shape[-1], dtype=torch.float64)
    for b in range(batch):
        labels = {0: source[b].double()}
        for t in range(1, frames):
            sources = [0] + [s for s in range(1, t) if s >= t - context]
            for n in range(cells):
                candidates = []
                for s in sources:
                    for m in range(cells):
                        if abs(n // w - m // w) <= radius and abs(n % w - m % w) <= radius:
                            cos = F.cosine_similarity(features[b, t, n], features[b, s, m], dim=0)
                            candidates.append((math.exp(cos.item() / tau), s, m))
                kth = sorted((v for v, _, _ in candidates), reverse=True)[topk - 1]
                kept = [(v, s, m) for v, s, m in candidates if v >= kth]
                total = sum(v for v, _, _ in kept)
                out[b, t - 1, n] = sum(v / total * labels[s][m] for v, s, m in kept)
            labels[t] = out[b, t - 1]
    return out


@pytest.mark.parametrize("context", [1, 7])
def test_feature_forwarder_equals_the_dense_definition(context):
    g = torch.Generator().manual_seed(0)
    grid = (3, 4)
    features = torch.randn(2, 4, 12, 5, generator=g, dtype=torch.float64)
    source = torch.softmax(torch.randn(2, 12, 3, generator=g, dtype=torch.float64), -1)
    got = feature_forwarder(features, source, grid, context=context, radius=1, topk=3, temperature=0.1)
    want = dense_forwarder(features, source, grid, context, 1, 3, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == (2, 3, 12, 3)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, 12, dtype=torch.float64))
    # context 1: frame 3 reads frames 0 and 2 only, so frame 1 can be changed without effect on it
    changed = features.clone()
    changed[:, 1] = torch.randn(2, 12, 5, generator=g, dtype=torch.float64)
    again = feature_forwarder(changed, source, grid, context=context, radius=1, topk=3, temperature=0.1)
    assert not torch.allclose(again[:, 0], got[:, 0])


def test_feature_forwarder_refuses_more_neighbours_than_cells():
    with pytest.raises(ValueError, match="top-5 of a 2x2 patch grid"):
        feature_forwarder(torch.randn(1, 2, 4, 3), torch.rand(1, 4, 2), (2, 2), context=7, radius=6, topk=5,
                          temperature=0.1)


def test_loss_of_uniform_scores_is_ln_k_and_matches_hand_computation():
    labels = torch.randint(0, 200, (2, 196))
    assert timet_loss(torch.zeros(2, 196, 200), labels, 0.1).item() == pytest.approx(math.log(200), rel=1e-6)
    scores = torch.tensor([[[0.5, -0.2, 0.1]]], dtype=torch.float64)
    want = -(5.0 - math.log(math.exp(5.0) + math.exp(-2.0) + math.exp(1.0)))
    assert timet_loss(scores, torch.tensor([[0]]), 0.1).item() == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- reference cross-check (§7.2)


class PseudoImageBackbone(nn.Module):
    """§7.2's feature-extractor stub without its head: pseudo-images (n, 384, 14, 14) are their tokens."""

    embed_dim = 384

    def forward_features(self, x):
        return {"patches": x.flatten(2).transpose(1, 2), "grid": tuple(x.shape[-2:])}


def reference_sinkhorn(q, iterations):
    """my_utils.py `sinkhorn` on one process, as §0.3 describes it."""
    q = q / q.sum()
    k, n = q.shape
    r, c = torch.ones(k, dtype=q.dtype) / k, torch.ones(n, dtype=q.dtype) / n
    for _ in range(iterations):
        q = q * (r / q.sum(dim=1)).unsqueeze(1)
        q = q * (c / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).t().float()


def reference_neighbourhood(size, radius):
    """mask_propagation.py `restrict_neighborhood`: four nested loops over target and window cells."""
    mask = torch.zeros(size, size, size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            for p in range(2 * radius + 1):
                for q in range(2 * radius + 1):
                    row, col = i - radius + p, j - radius + q
                    if 0 <= row < size and 0 <= col < size:
                        mask[i, j, row, col] = 1
    return mask.reshape(size * size, size * size)


def reference_get_loss(head, prototypes, teacher_head, teacher_prototypes, x, n_last_frames=7, window=6,
                       topk=5, epsilon=0.05, iterations=10):
    """time_tuning.py `TimeT.get_loss` (teacher on, no queue, no mask) as §2.a lists its steps."""
    bs, fs, c, h, w = x.shape
    tokens = x.reshape(bs * fs, c, h * w).transpose(1, 2)  # the stub's forward
    teacher_z = teacher_head(tokens).reshape(bs, fs, h * w, -1)
    student_z = head(tokens).reshape(bs, fs, h * w, -1)
    backbone = tokens.reshape(bs, fs, h * w, c).detach()
    s0 = F.normalize(teacher_z[:, 0].reshape(bs * h * w, -1), dim=-1) @ teacher_prototypes.t()
    q0 = reference_sinkhorn(torch.exp(s0 / epsilon).t(), iterations).reshape(bs, h * w, -1)
    target_scores = (F.normalize(student_z[:, -1].reshape(bs * h * w, -1), dim=-1) @ prototypes.t())
    target_scores = target_scores.reshape(bs, h * w, -1)
    mask = reference_neighbourhood(h, window)
    total = 0
    for i in range(bs):
        first_seg = q0[i].reshape(h, w, -1).permute(2, 0, 1).unsqueeze(0).double()  # (1, K, h, w)
        first_feat = backbone[i, 0].T  # (C, hw)
        previous = []  # the queue of (features, seg) pairs, at most n_last_frames
        seg = None
        for cnt in range(1, fs):
            feats = [first_feat] + [f for f, _ in previous]
            segs = [first_seg] + [s for _, s in previous]
            target = F.normalize(backbone[i, cnt], dim=1)  # (hw, C)
            sources = F.normalize(torch.stack(feats), dim=1)  # (n, C, hw)
            aff = torch.exp(torch.bmm(target.unsqueeze(0).repeat(len(feats), 1, 1), sources) / 0.1) * mask
            aff = aff.transpose(2, 1).reshape(-1, h * w)  # (n * hw source, hw target)
            kth = torch.topk(aff, dim=0, k=topk).values.min(dim=0).values
            aff[aff < kth] = 0
            aff = aff / aff.sum(dim=0, keepdim=True)
            stacked = torch.cat(segs)  # (n, K, h, w)
            stacked = stacked.reshape(len(segs), stacked.shape[1], -1).transpose(2, 1).reshape(-1, stacked.shape[1]).T
            seg = (stacked.double() @ aff.double()).reshape(1, -1, h, w)
            if len(previous) == n_last_frames:
                previous.pop(0)
            previous.append((backbone[i, cnt].T, seg))
        labels = seg.argmax(dim=1).long()  # (1, h, w)
        scores = target_scores[i].reshape(h, w, -1).permute(2, 0, 1).unsqueeze(0)
        total = total + F.cross_entropy(scores / 0.1, labels)
    return total / bs


def stub_timet(teacher="inverted"):
    """TimeT with §7.2's stub: a Linear(384 -> 256) head and 200 prototypes, seeded as the recipe says."""
    cfg = TimeTConfig(head_dims=(256,), teacher=teacher)
    objective = build(cfg, arch="vit_small_patch16")  # a 384-wide student, replaced by the stub
    objective.student = PseudoImageBackbone()
    torch.manual_seed(0)
    with torch.no_grad():
        linear = nn.Linear(384, 256)
        objective.student_head.mlp[0].load_state_dict(linear.state_dict())
        objective.student_head.prototypes.copy_(F.normalize(torch.randn(200, 256), dim=-1))
    if teacher != "none":
        objective.teacher = EMATeacher(objective.student)
        objective.teacher_head = EMATeacher(objective.student_head)
    return objective


def test_loss_equals_the_reference_get_loss(float64):
    objective = stub_timet()
    torch.manual_seed(1)
    x = torch.randn(2, 4, 384, 14, 14)
    loss, logs = objective({"clip": x})
    head = objective.student_head
    want = reference_get_loss(head.mlp, head.prototypes, objective.teacher_head.net.mlp,
                              objective.teacher_head.net.prototypes, x)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert loss.item() == pytest.approx(5.250258, abs=1e-6)  # the released code's value (spec §7.9)
    assert 1 < logs["label_clusters"] <= 200
    # and the gradients: same function of the head and prototypes
    got = torch.autograd.grad(loss, [head.mlp[0].weight, head.prototypes])
    want_grads = torch.autograd.grad(want, [head.mlp[0].weight, head.prototypes])
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_zero_head_gives_ln_200_whatever_the_labels(float64):
    objective = stub_timet()
    with torch.no_grad():
        objective.student_head.mlp[0].weight.zero_()
        objective.student_head.mlp[0].bias.zero_()
    loss, _ = objective({"clip": torch.randn(2, 4, 384, 14, 14)})
    assert loss.item() == pytest.approx(math.log(200), rel=1e-9)


@pytest.mark.parametrize("mode,weight_of_old", [("inverted", 0.005), ("ema", 0.995)])
def test_teacher_update_direction(mode, weight_of_old):
    objective = build(dataclasses.replace(TINY, teacher=mode), total_steps=1000)
    with torch.no_grad():
        for p in [*objective.student.parameters(), *objective.student_head.mlp.parameters()]:
            p.add_(1.0)
    old = [p.clone() for p in objective.teacher.net.parameters()]
    student = [p.clone() for p in objective.student.parameters()]
    m = objective.momentum(0)
    assert m == pytest.approx(0.995)
    objective.after_step(0)
    for t0, s, t1 in zip(old, student, objective.teacher.net.parameters()):
        torch.testing.assert_close(t1, weight_of_old * t0 + (1 - weight_of_old) * s)
    for prototypes in (objective.student_head.prototypes, objective.teacher_head.net.prototypes):
        torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(8))


# ---------------------------------------------------------------- the objective


def test_views_are_the_clip_family():
    views = build().views()
    assert (views.family, views.frames, views.stride, views.size, views.jitter) == ("clip", 4, 1, 48,
                                                                                        (0.8, 0.8, 0.8, 0.2))


def test_minimum_vit_passes_and_no_gradient_into_the_targets():
    objective = build()
    passes = []
    for name in ("student", "teacher"):
        net = getattr(objective, name)
        net = getattr(net, "net", net)
        net.patch_embed.register_forward_hook(lambda m, i, o, name=name: passes.append(
            (name, i[0].shape[0], torch.is_grad_enabled())))
    batch = clips()
    batch["clip"].requires_grad_(True)
    loss, _ = objective(batch)
    loss.backward()
    # the student once over the 3 earlier frames without a graph and once over the last frame with one;
    # the teacher once over the first frame
    assert sorted(passes) == sorted([("student", 6, False), ("student", 2, True), ("teacher", 2, False)])
    grad = batch["clip"].grad
    assert grad[:, :-1].abs().max() == 0 and grad[:, -1].abs().max() > 0
    assert all(p.grad is None for p in objective.teacher.parameters())
    assert all(p.grad is None for p in objective.teacher_head.parameters())


def test_gradients_reach_only_the_unfrozen_blocks_head_and_prototypes():
    objective = build()
    freeze_backbone(objective, ("blocks.10", "blocks.11"))
    loss, _ = objective(clips())
    loss.backward()
    got = {name for name, p in objective.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    want = {f"student.{n}" for n, _ in objective.student.named_parameters() if n.startswith(("blocks.10.", "blocks.11."))}
    want |= {f"student_head.{n}" for n, _ in objective.student_head.named_parameters()}
    assert got == want


def test_loss_falls_on_a_fixed_batch():
    objective = build()
    losses, logs = fit(objective, clips(), 8, 1e-3)
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(logs) == {"label_clusters", "target_accuracy", "source_confidence"}


def test_without_a_teacher_the_student_makes_the_targets():
    objective = build(dataclasses.replace(TINY, teacher="none"))
    assert not hasattr(objective, "teacher") and objective.teacher_pairs() == []
    assert objective.begin_step(0) == {}
    loss, _ = objective(clips())
    assert torch.isfinite(loss)


def test_queue_fills_with_first_frame_rows_and_then_joins_the_sinkhorn():
    cfg = dataclasses.replace(TINY, queue_size=40, queue_rows_per_clip=10)
    objective, plain = build(cfg), build()
    batch = clips()
    first = plain.source_assignment(batch["clip"][:, 0], None)
    assert torch.equal(objective.source_assignment(batch["clip"][:, 0], None), first)  # queue not full yet
    assert int(objective.queue.count) == 18  # min(10 per clip x 2 clips, 2 x 9 cells)
    objective.source_assignment(batch["clip"][:, 0], None)
    objective.source_assignment(batch["clip"][:, 0], None)
    assert objective.queue.full
    with_queue = objective.source_assignment(batch["clip"][:, 0], None)
    assert with_queue.shape == first.shape and not torch.allclose(with_queue, first)
    torch.testing.assert_close(with_queue.sum(-1), torch.ones(2, 9))
