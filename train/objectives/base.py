"""What every objective provides to train/run.py: its views, its loss, and its per-step hooks."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from models.io import load_weights
from pipeline import ViewSpec
from train.teacher import EMATeacher


class Objective(nn.Module):
    """A method: the trainable modules, the views it needs, and its loss on a batch.

    Subclasses set ``Config`` (their dataclass of knobs, the YAML section named after the method)
    and ``default_arch``, and are built as ``cls(cfg, arch=..., drop_path=..., total_steps=...,
    steps_per_epoch=...)``: step-indexed schedules (teacher momentum, temperatures) need both.

    The trainer's generic fine-tuning knobs (train/finetune.py: ``model.init``, ``model.trainable``,
    ``optim.backbone_lr_mult``, ``optim.backbone_frozen_steps``) act on :meth:`student_backbone`;
    :meth:`teacher_pairs` lets them restart the teachers after loading pretrained weights.
    """

    Config: ClassVar[type]
    default_arch: ClassVar[str]
    find_unused_parameters: ClassVar[bool] = False
    """True when some trainable parameter can get no gradient in a step (multi-process runs then
    tell DDP to look for them, which costs a graph traversal per step)."""

    def views(self) -> ViewSpec:
        """The views the pipeline must produce for this method."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and detached scalars to log (loss terms, collapse monitors)."""
        raise NotImplementedError

    def begin_step(self, step: int) -> dict[str, float]:
        """Set step-scheduled values before the forward pass; returns them for logging."""
        return {}

    def before_optimizer_step(self, step: int) -> None:
        """Edit gradients after backward (e.g. keep a layer frozen); runs before clipping."""

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """State updates after the optimiser step (EMA teacher, queues)."""

    def backbone(self) -> nn.Module:
        """The network exported as the run's backbone (built by ``models.build``)."""
        raise NotImplementedError

    def export_heads(self) -> dict[str, tuple[nn.Module, dict]]:
        """Networks besides the backbone that evaluation reads, by file stem: ``{name: (module, settings)}``,
        exported as ``<name>.safetensors`` next to ``backbone.safetensors`` with the JSON ``settings``
        that rebuild the module (``models.io.export_head``). None by default."""
        return {}

    def student_backbone(self) -> nn.Module:
        """The backbone network the optimiser trains (built by ``models.build``): what ``model.init``
        loads, what ``model.trainable`` selects in, and what ``optim.backbone_lr_mult`` scales."""
        raise NotImplementedError

    def teacher_pairs(self) -> list[tuple[EMATeacher, nn.Module]]:
        """Every EMA teacher of the objective with the student module it follows (none by default)."""
        return []

    def load_backbone_weights(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
        """Start the student backbone from ``state`` (backbone keys, as ``models.io.backbone_state_dict``
        returns them), then restart every teacher from its student so it starts from them too.
        Missing or foreign keys raise ValueError naming them; returns the skipped (head) entries."""
        skipped = load_weights(self.student_backbone(), state, source=source)
        for teacher, student in self.teacher_pairs():
            teacher.restart(student)
        return skipped
