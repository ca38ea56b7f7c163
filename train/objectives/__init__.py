"""Objectives by name: ``OBJECTIVES[cfg.method](cfg.objective, arch=..., ...)``."""
from train.objectives.base import Objective
from train.objectives.crw import CRW
from train.objectives.dino import DINO
from train.objectives.smtc import SMTC
from train.objectives.timet import TimeT

OBJECTIVES: dict[str, type[Objective]] = {"crw": CRW, "dino": DINO, "smtc": SMTC, "timet": TimeT}

__all__ = ["OBJECTIVES", "Objective"]
