"""The teacher of a teacher-student pair: a frozen copy of a student network that follows it by EMA.

DINO, DoRA, SelfPatch, TimeT and SMTC all distil a student into targets made by such a copy::

    teacher = EMATeacher(student, twin=models.build(arch, drop_path=0.0))   # same weights, no drop path
    with torch.no_grad():
        targets = teacher(images)
    ...                                                                       # optimizer.step()
    teacher.update(student, momentum=cosine_schedule(step, 0.996, 1.0, total_steps))

The teacher never receives gradients and always runs in eval mode (no dropout, no stochastic depth,
BatchNorm on running statistics), whatever mode the objective around it is in. Parameters under a
``frozen`` prefix are copied once and then never move: SMTC keeps its teacher's encoder at its
initial weights while the rest follows the student.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from train.optim import ema_update_


class EMATeacher(nn.Module):
    """Exponential-moving-average copy of ``student``; call it like the network it wraps.

    Args:
        student: the network to follow.
        twin: an architecture twin built by the caller (e.g. the same ViT without drop path); it
            receives the student's weights. Default: a deep copy of the student.
        frozen: parameter-name prefixes (as in ``student.named_parameters()``) kept at their
            initial values instead of following the student.
    """

    def __init__(self, student: nn.Module, twin: nn.Module | None = None, frozen: Iterable[str] = ()) -> None:
        super().__init__()
        self.net = copy.deepcopy(student) if twin is None else twin
        self.restart(student)
        self.net.requires_grad_(False)
        self.net.eval()
        self.frozen = tuple(frozen)
        unknown = [p for p in self.frozen if not any(n.startswith(p) for n, _ in student.named_parameters())]
        if unknown:
            raise ValueError(f"EMATeacher: frozen prefixes {unknown} match no parameter of the student")

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.net.eval()  # targets never see dropout or drop path
        return self

    @torch.no_grad()
    def restart(self, student: nn.Module) -> None:
        """Become an exact copy of ``student`` again, frozen parameters included (after the student
        was loaded from pretrained weights: SMTC's frozen encoder is the loaded one)."""
        self.net.load_state_dict(student.state_dict())

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, on every parameter not frozen."""
        mine, theirs = dict(self.net.named_parameters()), dict(student.named_parameters())
        if mine.keys() != theirs.keys():
            raise ValueError("EMATeacher.update: the student's parameter names differ from the teacher's: "
                             f"{sorted(mine.keys() ^ theirs.keys())[:5]}")
        moving = [name for name in mine if not name.startswith(self.frozen)]
        ema_update_([mine[n] for n in moving], [theirs[n] for n in moving], momentum)
