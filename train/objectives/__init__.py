"""Objectives by name: ``OBJECTIVES[cfg.method](cfg.objective, arch=..., ...)``."""
from train.objectives.base import Objective
from train.objectives.crw import CRW
from train.objectives.dino import DINO
from train.objectives.dora import DoRA
from train.objectives.neco import NeCo
from train.objectives.selfpatch import SelfPatch
from train.objectives.smtc import SMTC
from train.objectives.timet import TimeT

OBJECTIVES: dict[str, type[Objective]] = {"crw": CRW, "dino": DINO, "timet": TimeT, "selfpatch": SelfPatch,
                                     "dora": DoRA, "smtc": SMTC, "neco": NeCo}

__all__ = ["OBJECTIVES", "Objective"]
