"""Optimisation mechanics: schedules, parameter groups, DINO-style clipping, EMA, LR scaling."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def cosine_schedule(step: int, base: float, final: float, total_steps: int,
                    warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Value at ``step`` of DINO's ``cosine_scheduler`` array, computed in closed form.

    Linear warm-up from ``warmup_start`` reaching ``base`` at step ``warmup_steps - 1``, then a
    half cosine from ``base`` to ``final`` over the remaining ``total_steps - warmup_steps`` steps.
    """
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / max(warmup_steps - 1, 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def scaled_lr(lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """Learning rate for ``global_batch`` from one tuned at ``reference_batch`` (linear, sqrt, none)."""
    ratio = global_batch / reference_batch
    factors = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}
    if rule not in factors:
        raise ValueError(f"optim.lr_scaling must be one of {sorted(factors)}, got {rule!r}")
    return lr * factors[rule]


def param_groups(model: nn.Module, backbone: nn.Module | None = None) -> list[dict]:
    """Trainable parameters split as DINO does: biases and 1-D tensors (norms) get no weight decay.

    With ``backbone`` (a submodule of ``model``), its parameters form their own two groups, marked
    ``backbone=True``, so they can follow another learning rate (:func:`set_lr_wd`); empty groups
    are left out. Without it: [decay, no_decay].
    """
    in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups = {(part, decay): [] for part in (False, True) for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = not (name.endswith(".bias") or p.ndim == 1)
            groups[id(p) in in_backbone, decay].append(p)
    out = []
    for (part, decay), params in groups.items():
        if backbone is None and part:
            continue
        if backbone is not None and not params:
            continue
        group = {"params": params, "decay": decay, "backbone": part}
        out.append(group if decay else {**group, "weight_decay": 0.0})
    return out


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> None:
    """Apply this step's scheduled values; groups marked ``decay=False`` keep zero weight decay and
    groups marked ``backbone=True`` get ``lr * backbone_lr_mult``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * backbone_lr_mult if group.get("backbone", False) else lr
        if group.get("decay", True):
            group["weight_decay"] = weight_decay


@torch.no_grad()
def grad_norms(params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients present and their L2 norms (one fused kernel per device and dtype)."""
    grads = [p.grad for p in params if p.grad is not None]
    return grads, list(torch._foreach_norm(grads)) if grads else []


@torch.no_grad()
def clip_gradients_(params: Iterable[torch.Tensor], max_norm: float, mode: str) -> torch.Tensor:
    """Clip gradients in place and return the global gradient norm before clipping.

    ``per_param`` is DINO's rule: each parameter's gradient is scaled down separately when its own
    norm exceeds ``max_norm`` (1e-6 guard). ``global`` is ``clip_grad_norm_``. ``max_norm <= 0``
    only measures.
    """
    grads, norms = grad_norms(params)
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm <= 0:
        return total
    if mode == "per_param":
        scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, scales)
    elif mode == "global":
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    else:
        raise ValueError(f"optim.clip_mode must be 'per_param' or 'global', got {mode!r}")
    return total


@torch.no_grad()
def ema_update_(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, fused over all tensors."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"EMA needs matching parameter lists, got {len(teacher)} vs {len(student)}")
    torch._foreach_lerp_(teacher, [s.detach() for s in student], 1.0 - momentum)
