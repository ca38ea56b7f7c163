"""The CRW and DINO objectives as modules: views, a loss that falls on a fixed batch, DINO's state."""
import dataclasses
import math

import pytest
import torch

from train.objectives import OBJECTIVES
from train.objectives.crw import CRWConfig
from train.objectives.dino import DINOConfig

TINY_CRW = CRWConfig(size=64, patch_size=32, patch_stride=16, clip_len=3)
TINY_DINO = DINOConfig(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, global_size=32, local_size=16,
                       local_crops=2, freeze_last_layer_epochs=0)


def build(method, cfg, arch, **kw):
    torch.manual_seed(0)
    return OBJECTIVES[method](cfg, arch=arch, total_steps=10, steps_per_epoch=5, **kw)


def fit(objective, batch, steps, lr):
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    losses = []
    for step in range(steps):
        objective.begin_step(step)
        loss, logs = objective(batch)
        opt.zero_grad()
        loss.backward()
        objective.before_optimizer_step(step)
        opt.step()
        objective.after_step(step)
        losses.append(loss.item())
    return losses, logs


def test_crw_views_describe_the_grid():
    views = build("crw", TINY_CRW, "resnet18_crw").views()
    assert (views.family, views.frames, views.patch_size, views.patch_stride, views.size) == ("grid", 3, 32, 16, 64)
    assert views.grid_side ** 2 == 9
    cifar = build("crw", dataclasses.replace(TINY_CRW, norm_stats="cifar"), "resnet18_crw").views()
    assert cifar.mean == (0.4914, 0.4822, 0.4465)


@pytest.mark.parametrize("arch,patch,lr", [("resnet18_crw", 16, 3e-4), ("vit_tiny_patch16", 32, 1e-3)])
def test_crw_loss_falls_on_a_fixed_batch(arch, patch, lr):
    patches = torch.randn(1, 3, 9, 3, patch, patch, generator=torch.Generator().manual_seed(1))
    cfg = dataclasses.replace(TINY_CRW, edge_dropout=0.0, size=2 * patch, patch_size=patch, patch_stride=patch // 2)
    losses, logs = fit(build("crw", cfg, arch), {"patches": patches}, 5, lr)
    assert losses[-1] < 0.8 * losses[0]
    assert set(logs) >= {"xent_k1", "acc_k2", "node_std"}


def dino_batch(b=2):
    g = torch.Generator().manual_seed(2)
    return {"global": torch.randn(b, 2, 1, 3, 32, 32, generator=g),
            "local": torch.randn(b, 2, 1, 3, 16, 16, generator=g)}


def test_dino_views_are_multicrop():
    views = build("dino", TINY_DINO, "vit_tiny_patch16").views()
    assert (views.family, views.frames, views.global_crops, views.local_crops, views.global_size) == (
        "multicrop", 1, 2, 2, 32)


def test_dino_loss_falls_and_teacher_follows_student():
    objective = build("dino", TINY_DINO, "vit_tiny_patch16")
    teacher_before = [p.clone() for p in objective.teacher.parameters()]
    for p, q in zip(objective.student.parameters(), objective.teacher.parameters()):
        assert torch.equal(p, q)  # the teacher starts as a copy of the student
    losses, logs = fit(objective, dino_batch(), 5, 1e-3)
    assert losses[-1] < losses[0]
    assert set(logs) == {"teacher_entropy", "teacher_mean_entropy", "feature_std"}
    assert 0 <= logs["teacher_entropy"] <= math.log(64) + 1e-5
    moved = [not torch.equal(a, b) for a, b in zip(teacher_before, objective.teacher.parameters())]
    assert any(moved)
    assert all(not p.requires_grad for p in objective.teacher.parameters())


def test_dino_ema_step_uses_the_scheduled_momentum():
    objective = build("dino", TINY_DINO, "vit_tiny_patch16")
    with torch.no_grad():
        for p in objective.student.parameters():
            p.add_(1.0)
    teacher = [p.clone() for p in objective.teacher.parameters()]
    student = [p.clone() for p in objective.student.parameters()]
    m = objective.momentum(3)
    assert 0.996 < m < 1
    objective.after_step(3)
    for t0, s, t1 in zip(teacher, student, objective.teacher.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s)


def test_dino_center_is_an_ema_of_the_teacher_batch_mean():
    objective = build("dino", TINY_DINO, "vit_tiny_patch16")
    objective.center.fill_(1.0)
    logits = torch.randn(2, 3, 64)
    objective.update_center(logits)
    torch.testing.assert_close(objective.center, 0.9 * torch.ones(1, 64) + 0.1 * logits.mean((0, 1), keepdim=True)[0])


def test_dino_last_layer_frozen_during_first_epochs():
    objective = build("dino", dataclasses.replace(TINY_DINO, freeze_last_layer_epochs=1), "vit_tiny_patch16")
    loss, _ = objective(dino_batch())
    loss.backward()
    objective.before_optimizer_step(4)  # epoch 0 (5 steps per epoch)
    assert all(p.grad is None for p in objective.student_head.last_layer.parameters())
    assert objective.student_head.mlp[0].weight.grad is not None
    objective.zero_grad()
    loss, _ = objective(dino_batch())
    loss.backward()
    objective.before_optimizer_step(5)  # epoch 1
    assert objective.student_head.last_layer.weight_v.grad is not None


def dinov2_sinkhorn_targets(teacher_logits, temperature, iterations=3):
    """DINOv2's Sinkhorn-Knopp teacher centering, written out from its description: Q = exp(t / T) over
    (prototypes, rows), scaled to mass 1, then alternately each prototype's mass set to 1/K and each row's
    to 1/N; the rows, scaled back by N, are the targets."""
    q = torch.exp(teacher_logits.double() / temperature).T
    prototypes, rows = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / prototypes
        q = q / q.sum(dim=0, keepdim=True) / rows
    return (q * rows).T


def test_dino_sinkhorn_centering_gives_dinov2s_targets_and_keeps_no_center():
    objective = build("dino", dataclasses.replace(TINY_DINO, centering="sinkhorn"), "vit_tiny_patch16",
                      drop_path=0.0).double()  # no stochastic depth: the loss is recomputed below
    objective.center.fill_(0.5)
    batch = {k: v.double() for k, v in dino_batch(b=3).items()}
    loss, logs = objective(batch)

    global_images = batch["global"].flatten(1, 2).transpose(0, 1).flatten(0, 1)  # view-major, as the objective
    local_images = batch["local"].flatten(1, 2).transpose(0, 1).flatten(0, 1)
    with torch.no_grad():
        teacher_logits = objective.teacher_head(objective.teacher(global_images))
        student_logits = objective.student_head(
            torch.cat([objective.student(global_images), objective.student(local_images)]))
    targets = dinov2_sinkhorn_targets(teacher_logits, objective.teacher_temp).unflatten(0, (2, 3))
    log_probs = torch.log_softmax(student_logits / objective.cfg.student_temp, -1).unflatten(0, (4, 3))
    pairs = [-(targets[g] * log_probs[v]).sum(-1).mean() for g in range(2) for v in range(4) if v != g]
    torch.testing.assert_close(loss, torch.stack(pairs).mean(), rtol=1e-10, atol=0)
    assert torch.equal(objective.center, torch.full_like(objective.center, 0.5))  # no running center
