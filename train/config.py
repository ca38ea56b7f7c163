"""Typed training configuration: dataclass defaults <- configs/<method>.yaml <- --config <- CLI.

Every section is a dataclass whose fields carry their help text as attribute docstrings; the
command line gets one ``--section.field`` option per field, generated from these classes. A key
that no section knows fails fast, naming where it came from and the closest valid key.

Importing this module does not import torch: train/run.py checks a whole command line (every section
but the method's own, whose dataclass lives with the objective) before paying for torch.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import DataConfig
from shard_tools.cli import ArgumentParser, did_you_mean

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Every method has its YAML of defaults; listing them needs no import of the objectives (torch).
METHODS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))


class ConfigError(ValueError):
    """A configuration value or key that cannot be used."""


@dataclass
class ModelSection:
    """The backbone (models.build)."""

    arch: str = ""
    """models.build name; empty: the method's default (resnet18_crw for CRW, vit_small_patch16 for DINO)."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the trained (student) ViT."""
    init: str = ""
    """Checkpoint the backbone starts from (student and teachers): an official DINO / timm / videowalk
    file, or a densevid backbone.safetensors / checkpoint (teacher weights when it holds both); read by
    models.io. Empty: random initialisation. Ignored when a run resumes (the checkpoint has the weights)."""
    trainable: tuple[str, ...] = ()
    """Backbone parameter-name prefixes that train, e.g. [blocks.10, blocks.11]; the rest of the backbone
    is frozen (no gradient is computed for it). Empty: the whole backbone trains."""

    def __post_init__(self) -> None:
        # Absolute, so config.yaml says which file was loaded and a resume from elsewhere still matches.
        self.init = str(Path(self.init).expanduser().resolve()) if self.init else ""


@dataclass
class OptimSection:
    """AdamW with cosine learning-rate and weight-decay schedules."""

    lr: float = 5e-4
    """Peak learning rate at optim.lr_reference_batch samples per step."""
    lr_reference_batch: int = 256
    """Global batch that optim.lr is tuned for."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    """How the peak LR follows the global batch: lr * (global / reference), its sqrt, or unchanged."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine."""
    warmup_epochs: float = 10.0
    """Linear LR warm-up length in epochs (an epoch is manifest samples / global batch steps)."""
    weight_decay: float = 0.04
    """Weight decay at step 0 (biases and norms never decay)."""
    weight_decay_end: float = 0.4
    """Weight decay at the last step (cosine in between)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    clip_grad: float = 3.0
    """Gradient clipping threshold; 0 disables clipping."""
    clip_mode: Literal["per_param", "global"] = "per_param"
    """per_param: DINO's rule, each tensor clipped to the threshold on its own; global: total norm."""
    accum_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    backbone_lr_mult: float = 1.0
    """The backbone's LR is the scheduled LR times this (TimeT 0.1: backbone 1e-5 under a 1e-4 head)."""
    backbone_frozen_steps: int = 0
    """Steps at the start during which the backbone's LR is 0 (SMTC's grad_iter): its gradients are
    still computed, so Adam's moments follow them as in SMTC, but its weights do not move."""

    def __post_init__(self) -> None:
        if self.accum_steps < 1 or self.lr_reference_batch < 1:
            raise ValueError("optim.accum_steps and optim.lr_reference_batch must be >= 1")
        if self.backbone_lr_mult < 0 or self.backbone_frozen_steps < 0:
            raise ValueError("optim.backbone_lr_mult and optim.backbone_frozen_steps must be >= 0")


@dataclass
class RunSection:
    """Length, precision, logging and checkpointing of the run."""

    steps: int = 1000
    """Optimiser steps in the whole run (schedules span exactly this many)."""
    seed: int = 0
    """Seed of the initial weights and of in-model randomness (drop path, edge dropout; offset per rank).
    Sampling and augmentation follow data.seed."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast on GPU; the CPU path always runs float32."""
    log_every: int = 10
    """Steps between TensorBoard / log.jsonl records."""
    ckpt_every: int = 1000
    """Steps between checkpoints (one is always written at the end and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 3
    """Most recent checkpoints kept on disk."""

    def __post_init__(self) -> None:
        if min(self.steps, self.log_every, self.ckpt_every, self.keep_checkpoints) < 1:
            raise ValueError("run.steps, run.log_every, run.ckpt_every and run.keep_checkpoints must be >= 1")


# Set by train/run.py from the launcher (each rank's device), so not offered as options.
DERIVED = {("data", "device")}
SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelSection, "optim": OptimSection, "run": RunSection}


@dataclass
class Config:
    """The resolved configuration of one run."""

    method: str
    data: DataConfig
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    objective: Any = None
    """The method's own section (e.g. CRWConfig), written under the method's name."""

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method}
        for name in SECTIONS:
            out[name] = _plain(dataclasses.asdict(getattr(self, name)))
        out[self.method] = _plain(dataclasses.asdict(self.objective))
        return out

    def dump(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Tuples to lists, so yaml.safe_dump writes plain YAML."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def field_help(cls: type) -> dict[str, str]:
    """Help per field: attribute docstrings (the string below a field), else ``name: text``
    paragraphs of the class docstring (the style of pipeline.DataConfig). Fields inherited from a
    dataclass base keep the base's text unless the subclass documents them again."""
    docs = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    names = {f.name for f in dataclasses.fields(cls)}
    current = None
    for line in inspect.getdoc(cls).splitlines():
        head, sep, text = line.partition(":")
        if sep and head.strip() in names and not line.startswith(" "):
            current = head.strip()
            docs.setdefault(current, "")
            docs[current] = (docs[current] + " " + text.strip()).strip()
        elif current and line.startswith(" "):
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from the command line are parsed."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # any length: [a, b], or "a,b" on the command line
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list like [a, b], got {value!r}")
            return tuple(_coerce(v, args[0], key) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values like [0.4, 1.0], got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or (tp is int and isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def build_section(cls: type, values: dict[str, Any], where: str, prefix: str) -> Any:
    """Instantiate ``cls`` from ``values``; missing or mistyped values fail with a clear message."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [k for k, f in fields.items() if k not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: {', '.join(prefix + k for k in missing)} must be set"
                          + (" (--data DIR)" if prefix == "data." else ""))
    typed = {k: _coerce(v, hints[k], f"{where}: {prefix}{k}") for k, v in values.items()}
    try:
        return cls(**typed)
    except ValueError as err:  # the section's own validation (__post_init__)
        raise ConfigError(f"{where}: {err}") from None


def objective_class(method: str) -> type:
    """The objective registered as ``method`` (this imports torch and the models)."""
    from train.objectives import OBJECTIVES

    return OBJECTIVES[method]


def _unknown_keys(section: str, unknown: list[str], known: set[str], where: str) -> ConfigError:
    dash = "--" if where == "command line" else ""
    names = [f"{dash}{section}.{k}" for k in unknown]
    hint = did_you_mean(names[0], [f"{dash}{section}.{k}" for k in sorted(known)])
    return ConfigError(f"{where}: unknown key(s) {', '.join(names)}{hint} "
                       f"(valid keys of '{section}': {', '.join(sorted(known))})")


def _merge(into: dict[str, dict], layer: dict[str, Any], where: str, method: str,
           tables: dict[str, type], origin: dict[tuple[str, str], str]) -> None:
    """Merge one layer (``section: {key: value}``) into the accumulated values; unknown keys fail.

    A section without a table (the method's own, before its dataclass is imported) is merged
    unchecked; ``origin`` remembers where each key came from, for the check made later.
    """
    for section, values in (layer or {}).items():
        if section == "method":
            if values != method:
                raise ConfigError(f"{where}: method {values!r} does not match --method {method}")
            continue
        if section not in into:
            raise ConfigError(f"{where}: unknown section '{section}'{did_you_mean(section, list(into))}; "
                              f"valid: {', '.join(into)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of key: value")
        if section in tables:
            known = {f.name for f in dataclasses.fields(tables[section])}
            unknown = sorted(set(values) - known)
            if unknown:
                raise _unknown_keys(section, unknown, known, where)
        into[section].update(values)
        origin.update({(section, key): where for key in values})


def load_config(method: str, config_file: str | None = None, overrides: dict[str, Any] | None = None,
                *, objective: bool = True) -> Config:
    """Resolve the configuration of ``method``: defaults, method YAML, user YAML, then overrides.

    ``overrides`` maps dotted keys (``optim.lr``, ``crw.temperature``) to values or strings.
    ``objective=False`` stops before the method's own section (``cfg.objective`` is None): everything
    but that section is checked without importing torch, which is what train/run.py does first.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}{did_you_mean(method, list(METHODS))}; "
                          f"available: {', '.join(METHODS)}")
    values: dict[str, dict] = {name: {} for name in (*SECTIONS, method)}
    origin: dict[tuple[str, str], str] = {}
    # data.device is set by train/run.py from the launcher; "cpu" until then, so that building the
    # section does not ask torch for a GPU.
    values["data"]["device"] = "cpu"
    command_line: dict[str, dict] = {}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override {key}: expected <section>.<key>")
        command_line.setdefault(section, {})[name] = value
    method_yaml = CONFIG_DIR / f"{method}.yaml"
    layers = [(str(method_yaml), method_yaml), (config_file, config_file and Path(config_file))]
    for where, path in layers:
        if path:
            if not path.is_file():
                raise ConfigError(f"--config {where}: no such file")
            _merge(values, yaml.safe_load(path.read_text()), where, method, SECTIONS, origin)
    _merge(values, command_line, "command line", method, SECTIONS, origin)
    built = {n: build_section(cls, values[n], "configuration", f"{n}.") for n, cls in SECTIONS.items()}
    cfg = Config(method=method, **built)
    if not objective:
        return cfg
    objective_cls = objective_class(method)
    known = {f.name for f in dataclasses.fields(objective_cls.Config)}
    for key in values[method]:
        if key not in known:
            where = origin[(method, key)]
            raise _unknown_keys(method, [k for k in values[method] if k not in known and origin[(method, k)] == where],
                                known, where)
    cfg.objective = build_section(objective_cls.Config, values[method], "configuration", f"{method}.")
    cfg.model.arch = cfg.model.arch or objective_cls.default_arch
    return cfg


def config_tables(method: str | None) -> dict[str, type]:
    """Every section's dataclass: the shared ones and ``method``'s own (every method's when None)."""
    from train.objectives import OBJECTIVES

    return {**SECTIONS, **{name: obj.Config for name, obj in OBJECTIVES.items() if method in (None, name)}}


def add_config_arguments(parser: argparse.ArgumentParser, tables: dict[str, type],
                         defaults: dict[str, dict] | None = None) -> None:
    """One ``--section.key`` option per field of every table; ``defaults`` (a ``Config.to_dict()``,
    e.g. the method's YAML resolved) are the defaults shown, else the dataclasses' own."""
    for section, cls in tables.items():
        shown = (defaults or {}).get(section)
        origin = ("this method's, from train/configs/<method>.yaml over the built-in ones" if shown
                  else "the built-in ones; train/configs/<method>.yaml overrides some of them (--method M "
                       "--help shows M's)")
        group = parser.add_argument_group(f"{section} options", f"{(cls.__doc__ or '').strip()} "
                                          f"Defaults shown are {origin}.")
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            if (section, f.name) in DERIVED:
                continue
            default = shown[f.name] if shown else (f.default if f.default is not dataclasses.MISSING else None)
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=f"{helps.get(f.name, '')} (default: {default})")


def overrides_from_args(args: argparse.Namespace, extras: list[str], method: str,
                        parser: "ArgumentParser") -> dict[str, Any]:
    """The ``--section.key`` options given: those ``parser`` knows, plus ``--<method>.key VALUE`` pairs
    it left in ``extras`` (checked once the method's dataclass is loaded). Other methods' options and
    anything else unknown fail here, before torch is imported."""
    given = {k: v for k, v in vars(args).items() if "." in k}
    rest = list(extras)
    while rest:
        option = rest.pop(0)
        name, eq, value = option.partition("=")
        section = name[2:].split(".")[0] if name.startswith("--") and "." in name else None
        if section in METHODS and section != method:
            raise ConfigError(f"{name} belongs to method '{section}' but --method is {method}")
        if section != method:
            raise ConfigError(parser.unrecognized([option, *rest]))
        if not eq:
            if not rest or rest[0].startswith("--"):
                raise ConfigError(f"{name}: expected a value")
            value = rest.pop(0)
        given[name[2:]] = value
    return given
