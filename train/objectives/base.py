"""What every objective provides to train/run.py: its views, its loss, and its per-step hooks."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pipeline import ViewSpec


class Objective(nn.Module):
    """A method: the trainable modules, the views it needs, and its loss on a batch.

    Subclasses set ``Config`` (their dataclass of knobs, the YAML section named after the method)
    and ``default_arch``, and are built as ``cls(cfg, arch=..., drop_path=..., total_steps=...,
    steps_per_epoch=...)``: step-indexed schedules (teacher momentum, temperatures) need both.
    """

    Config: ClassVar[type]
    default_arch: ClassVar[str]

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
