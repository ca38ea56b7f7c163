"""Objectives by name: ``OBJECTIVES[cfg.method](cfg.objective, arch=..., ...)``."""
from train.objectives.base import Objective
from train.objectives.crw import CRW
from train.objectives.dino import DINO
from train.objectives.dora import DoRA

OBJECTIVES: dict[str, type[Objective]] = {"crw": CRW, "dino": DINO, "dora": DoRA}

__all__ = ["OBJECTIVES", "Objective"]
