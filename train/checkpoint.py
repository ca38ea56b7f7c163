"""Atomic checkpoints of a run and stopping cleanly on SIGTERM / SIGINT (lookup: train/rundir.py).

A checkpoint is ``<run>/checkpoints/step-000100/``: Accelerate's state (model, optimiser, every
rank's RNG) plus one ``trainer-rank<r>.pt`` per rank (step, loader position, world size). It is
written under a hidden temporary name and renamed only once every rank has finished, so a crash
mid-write never leaves a checkpoint that ``--resume auto`` would pick up. What evaluation reads of a
checkpoint (``backbone.safetensors`` and the objective's heads) is exported into it by ``export_networks``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from models.io import export_backbone, export_head
from train.rundir import RUN_OUTPUTS, checkpoint_path, list_checkpoints


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer: equal on all ranks iff their copies are bit-identical."""
    return tensors_digest(module.state_dict().items())


def tensors_digest(named_tensors: Iterable[tuple[str, torch.Tensor]], prefix: bytes = b"") -> str:
    """SHA-256 of ``prefix``, then each name and its tensor's bytes, in the order given."""
    digest = hashlib.sha256(prefix)
    for name, tensor in named_tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sync_batchnorm_stats(module: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics (collective).

    DDP broadcasts buffers from rank 0 only at the start of each forward, so after a step each rank
    holds statistics updated with its own batch; rank 0's are the ones DDP would use next.
    """
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
            for buf in (sub.running_mean, sub.running_var, sub.num_batches_tracked):
                if buf is not None:
                    torch.distributed.broadcast(buf, src=0)


def save_checkpoint(accelerator: Accelerator, module: torch.nn.Module, run_dir: Path, step: int,
                    trainer_state: dict[str, Any], keep: int) -> Path:
    """Write this step's checkpoint atomically (collective: every rank must call it).

    Also checks that data parallelism kept every rank's copy of ``module`` identical; a divergence
    (a non-deterministic op outside DDP, a rank-dependent update) fails loudly instead of training on.
    """
    if accelerator.num_processes > 1:
        sync_batchnorm_stats(module)
    digest = weights_digest(module)
    digests = gather_object([digest]) if accelerator.num_processes > 1 else [digest]
    if len(set(digests)) != 1:
        raise RuntimeError(f"step {step}: the ranks' weights differ (digests {digests}); data-parallel "
                           "training diverged. Report this with the run's config.yaml and versions.json")
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save({**trainer_state, "world_size": accelerator.num_processes, "weights_sha256": digest},
               tmp / f"trainer-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a re-save of the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def export_networks(objective, folder: Path) -> list[Path]:
    """Export what eval reads into ``folder`` (a run, one of its checkpoints, its ``init/``): the backbone
    as ``backbone.safetensors`` and every head of ``objective.export_heads()`` as ``<name>.safetensors``."""
    written = [export_backbone(objective.backbone(), Path(folder) / "backbone.safetensors")]
    for name, (module, settings) in objective.export_heads().items():
        if f"{name}.safetensors" not in RUN_OUTPUTS:  # --overwrite must be able to remove it
            raise ValueError(f"head export {name}.safetensors is not listed in train/rundir.py RUN_OUTPUTS")
        written.append(export_head(module, Path(folder) / f"{name}.safetensors", settings))
    return written


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimiser and RNG from ``path``; return this rank's trainer state."""
    state_file = Path(path) / f"trainer-rank{accelerator.process_index}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: the checkpoint was written by fewer ranks than "
                                f"the {accelerator.num_processes} now running; resume with the same world size")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    if state["world_size"] != accelerator.num_processes:
        raise RuntimeError(f"{path} was written by {state['world_size']} ranks, now {accelerator.num_processes}: "
                           "the data position is per rank; resume with the same world size")
    accelerator.load_state(str(path))
    return state


class GracefulStop:
    """Turns SIGTERM / SIGINT into a flag the loop checks once per step; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
