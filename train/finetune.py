"""Starting from pretrained weights and training only part of the backbone, for every objective.

Each objective names the backbone it trains with ``Objective.student_backbone()``; these knobs act on
it, so TimeT, SMTC and the DINO-style methods share one mechanism:

* ``model.init PATH``: the student backbone starts from a checkpoint (official DINO, timm, videowalk,
  or a densevid export / checkpoint, read by models.io) and every EMA teacher restarts from its
  student (``Objective.load_backbone_weights``), so teachers start from the same weights.
* ``model.trainable``: only backbone parameters under these name prefixes train (TimeT: blocks 10
  and 11); the rest get ``requires_grad=False`` before the optimiser and DDP are built, so autograd
  never runs through the frozen blocks below the first trainable one and DDP never syncs them.
* ``optim.backbone_lr_mult`` / ``optim.backbone_frozen_steps``: the backbone's parameter groups get
  the scheduled LR times the multiplier, and 0 before the given step (SMTC's ``grad_iter``).
"""
from __future__ import annotations

from models.io import backbone_state_dict, infer_arch, read_checkpoint
from train.config import ConfigError, ModelSection, OptimSection
from train.objectives.base import Objective


def matches(name: str, prefixes: tuple[str, ...]) -> bool:
    """``name`` is one of ``prefixes`` or lies under one (``blocks.1`` holds ``blocks.1.mlp.fc1.weight``,
    not ``blocks.10...``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def load_init(objective: Objective, path: str) -> str:
    """Load ``path`` into the objective's student backbone and teachers; a phrase for the log."""
    try:
        checkpoint, _ = read_checkpoint(path)
        state, _ = backbone_state_dict(checkpoint)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"model.init: {err}") from None
    model = objective.student_backbone()
    own = model.state_dict()
    # Positional embeddings are resized to the model's grid by models.io; any other shape differs by arch.
    reshaped = [k for k in state.keys() & own.keys() if k != "pos_embed" and state[k].shape != own[k].shape]
    if reshaped:
        try:
            guess = " (it looks like %s)" % infer_arch(state)[0]
        except ValueError:
            guess = ""
        key = sorted(reshaped)[0]
        arch = getattr(model, "build_spec", ("the model",))[0]
        raise ConfigError(f"model.init {path}: {len(reshaped)} weights have other shapes than {arch}'s "
                          f"(e.g. {key}: {tuple(state[key].shape)} vs {tuple(own[key].shape)}){guess}; "
                          "pass the matching --model.arch")
    try:
        skipped = objective.load_backbone_weights(state, source=f"model.init {path}")
    except ValueError as err:  # names the missing or foreign keys
        raise ConfigError(str(err)) from None
    return f"backbone from {path} ({len(state) - len(skipped)} tensors" + (
        f", {len(skipped)} non-backbone entries skipped)" if skipped else ")")


def freeze_backbone(objective: Objective, trainable: tuple[str, ...]) -> str:
    """Freeze every backbone parameter outside the ``trainable`` prefixes; a phrase for the log."""
    names = [name for name, _ in objective.student_backbone().named_parameters()]
    unknown = [p for p in trainable if not any(matches(n, (p,)) for n in names)]
    if unknown:
        raise ConfigError(f"model.trainable: {', '.join(unknown)} match(es) no backbone parameter; "
                          f"names look like {', '.join(names[:3])}, ... (prefixes such as blocks.10)")
    frozen = 0
    for name, p in objective.student_backbone().named_parameters():
        if not matches(name, trainable):
            p.requires_grad_(False)
            frozen += 1
    return f"{len(names) - frozen} of {len(names)} backbone tensors train ({', '.join(trainable)})"


def prepare_backbone(objective: Objective, model_cfg: ModelSection, fresh: bool) -> str:
    """Apply ``model.init`` (on a fresh run only: a resumed one reads its checkpoint) and
    ``model.trainable``; returns what was done, for the start-up log line."""
    if not fresh:
        note = "weights from the checkpoint"
    elif model_cfg.init:
        note = load_init(objective, model_cfg.init)
    else:
        note = "random init"
    if model_cfg.trainable:
        note += "; " + freeze_backbone(objective, model_cfg.trainable)
    return note


def backbone_lr_mult(optim_cfg: OptimSection, step: int) -> float:
    """Factor of the scheduled LR that the backbone's parameter groups get at ``step``."""
    return 0.0 if step < optim_cfg.backbone_frozen_steps else optim_cfg.backbone_lr_mult
