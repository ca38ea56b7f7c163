"""Schedules, LR scaling, parameter groups, DINO's per-parameter clipping and the EMA update."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from train.optim import clip_gradients_, cosine_schedule, ema_update_, param_groups, scaled_lr, set_lr_wd


def dino_cosine_array(base, final, total, warmup, start=0.0):
    """DINO's utils.cosine_scheduler, rewritten from its description (objectives.md 0.2)."""
    warm = np.linspace(start, base, warmup) if warmup else np.array([])
    iters = np.arange(total - warmup)
    return np.concatenate([warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


@pytest.mark.parametrize("total,warmup", [(50, 0), (50, 10), (7, 3)])
def test_cosine_schedule_equals_dino_array(total, warmup):
    expected = dino_cosine_array(5e-4, 1e-6, total, warmup)
    got = [cosine_schedule(s, 5e-4, 1e-6, total, warmup) for s in range(total)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-18)


def test_momentum_schedule_goes_from_base_towards_one():
    values = [cosine_schedule(s, 0.996, 1.0, 100) for s in range(100)]
    assert values[0] == 0.996 and all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))


def test_lr_scaling_rules():
    assert scaled_lr(5e-4, 1024, 256, "linear") == pytest.approx(2e-3)
    assert scaled_lr(5e-4, 1024, 256, "sqrt") == pytest.approx(1e-3)
    assert scaled_lr(1e-4, 80, 20, "none") == 1e-4
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(1e-4, 80, 20, "cubic")


def test_param_groups_exclude_biases_and_norms_from_weight_decay():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = param_groups(model)
    assert [p.shape for p in decay["params"]] == [torch.Size([8, 4])]
    assert sorted(p.numel() for p in no_decay["params"]) == [2, 8, 8, 8]
    opt = torch.optim.AdamW([decay, no_decay], lr=1.0)
    set_lr_wd(opt, 0.5, 0.3)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.5, 0.3), (0.5, 0.0)]


def test_per_parameter_clipping_scales_each_tensor_on_its_own():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.6, 0.8])  # norms 5 and 1
    total = clip_gradients_([a, b], 2.0, "per_param")
    assert total.item() == pytest.approx(math.sqrt(26))
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * 2.0 / (5 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([0.6, 0.8]))  # under the threshold: untouched


def test_global_clipping_matches_torch():
    g = torch.Generator().manual_seed(0)
    ours = [torch.zeros(5, requires_grad=True) for _ in range(3)]
    ref = [torch.zeros(5, requires_grad=True) for _ in range(3)]
    for p, q in zip(ours, ref):
        p.grad = torch.randn(5, generator=g)
        q.grad = p.grad.clone()
    total = clip_gradients_(ours, 1.0, "global")
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert total.item() == pytest.approx(expected.item())
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad)


def test_zero_threshold_only_measures():
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.tensor([30.0, 40.0])
    assert clip_gradients_([p], 0.0, "per_param").item() == pytest.approx(50.0)
    assert p.grad.tolist() == [30.0, 40.0]


def test_ema_update_direction():
    teacher, student = [torch.full((3,), 1.0)], [torch.full((3,), 3.0)]
    ema_update_(teacher, student, 0.9)
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.9 * 1.0 + 0.1 * 3.0))
    with pytest.raises(ValueError, match="matching"):
        ema_update_(teacher, student * 2, 0.9)
