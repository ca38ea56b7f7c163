"""A run directory's checkpoints, and the choice a new command makes about them (no torch needed).

A run directory belongs to one run: a command that would start afresh in a folder that already
holds a run must say whether to continue it (``--resume auto`` / ``--resume PATH``) or to replace it
(``--overwrite``), so that two runs never mix checkpoints, logs and exported weights.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Everything train/run.py and eval/run.py write into a run directory: what --overwrite removes.
# The exported heads of every objective (Objective.export_heads) are listed too, so that a run never
# leaves another method's slots beside its own backbone.
RUN_OUTPUTS = (CHECKPOINT_DIR, "log.jsonl", "tb", "config.yaml", "versions.json", "backbone.safetensors",
               "slots.safetensors", "throughput.json", "eval", "init")
NONFINITE_DUMPS = "nonfinite-step-*.pt"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message names the flag that fixes it."""


def read_log(run_dir: Path) -> list[dict]:
    """The records of a run's log.jsonl, oldest first; [] before its first record."""
    log = Path(run_dir) / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """``auto``: the run's latest checkpoint, or None for a fresh run; else an explicit folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer-rank0.pt").is_file():
        raise RunDirError(f"--resume {resume}: not a densevid checkpoint folder (no trainer-rank0.pt); "
                                f"pass a {CHECKPOINT_DIR}/step-NNNNNN folder or 'auto'")
    return path


def check_run_dir(run_dir: Path, resume: str, overwrite: bool) -> None:
    """Refuse a fresh start over an existing run unless ``--overwrite`` says to replace it."""
    run_dir = Path(run_dir)
    if overwrite and resume != "none":
        raise RunDirError(f"--overwrite starts {run_dir} afresh and --resume {resume} continues a run: give one")
    held = list_checkpoints(run_dir)
    if resume == "none" and not overwrite and (held or (run_dir / "log.jsonl").is_file()):
        what = f"{len(held)} checkpoint(s), latest {held[-1].name}" if held else "a run's log.jsonl"
        raise RunDirError(f"--out {run_dir} already holds {what}: continue that run with --resume auto, "
                          "replace it with --overwrite, or choose a new --out")


def clear_run(run_dir: Path) -> list[str]:
    """Remove a previous run's outputs from ``run_dir`` (``--overwrite``); returns what was removed.
    Files the runs did not write are left alone."""
    removed = []
    for path in [*(Path(run_dir) / name for name in RUN_OUTPUTS), *sorted(Path(run_dir).glob(NONFINITE_DUMPS))]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    return removed
