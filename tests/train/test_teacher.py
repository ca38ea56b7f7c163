import pytest
import torch
from torch import nn

from train.teacher import EMATeacher


def student_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))


def test_teacher_starts_equal_has_no_gradients_and_stays_in_eval_mode():
    student = student_net()
    teacher = EMATeacher(student)
    for (name, s), (_, t) in zip(student.named_parameters(), teacher.net.named_parameters()):
        assert torch.equal(s, t), name
        assert not t.requires_grad
    nn.ModuleDict({"s": student, "t": teacher}).train()
    assert student.training and not teacher.net.training
    x = torch.randn(16, 4)
    assert torch.equal(teacher(x), teacher(x))  # dropout off: the targets are deterministic


def test_update_is_the_ema_and_frozen_prefixes_keep_their_initial_values():
    student = student_net()
    teacher = EMATeacher(student, frozen=["0."])
    before = {n: p.clone() for n, p in teacher.net.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(student, momentum=0.9)
    now, theirs = dict(teacher.net.named_parameters()), dict(student.named_parameters())
    for name in ("0.weight", "0.bias"):
        assert torch.equal(now[name], before[name])
    for name in ("2.weight", "2.bias"):
        torch.testing.assert_close(now[name], 0.9 * before[name] + 0.1 * theirs[name])


def test_twin_receives_the_student_weights_and_mismatches_are_refused():
    student = student_net()
    twin = nn.Sequential(nn.Linear(4, 8), nn.Identity(), nn.Linear(8, 2))  # same weights, no dropout
    teacher = EMATeacher(student, twin=twin)
    assert teacher.net is twin and torch.equal(twin[2].weight, student[2].weight)
    with pytest.raises(ValueError, match="match no parameter"):
        EMATeacher(student, frozen=["encoder."])
    with pytest.raises(ValueError, match="parameter names differ"):
        teacher.update(nn.Sequential(nn.Linear(4, 8)), 0.9)
