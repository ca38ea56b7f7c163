"""Objectives by name: ``OBJECTIVES[cfg.method](cfg.objective, arch=..., ...)``."""
from train.objectives.base import Objective
from train.objectives.crw import CRW
from train.objectives.dino import DINO
from train.objectives.selfpatch import SelfPatch

OBJECTIVES: dict[str, type[Objective]] = {"crw": CRW, "dino": DINO, "selfpatch": SelfPatch}

__all__ = ["OBJECTIVES", "Objective"]
