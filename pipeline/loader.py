"""`build_loader`: the endless, resumable stream of view batches an objective trains on.

Design (measured facts: ../shared/docs/dali.md, "Measured on an H100"; our numbers:
docs/benchmarks.md, "Data pipeline"):
* JPEG-frame samples are read through the pack-time index from mmap'ed tars; a sample's T frames
  are sliced out by name, never a whole sample. Video samples hand their container to a decoder
  that seeks to the start frame.
* Every random choice (epoch order, start frame, boxes, flips, colour) is drawn in Python from a
  generator keyed by (seed, rank, epoch, index) (`pipeline.params`), so the DALI graph and the CPU
  path render identical parameters and a resume replays the stream exactly.
* Decoding is the only backend-specific step: DALI (nvJPEG / NVDEC on a GPU, DALI's CPU decoders
  without one; `pipeline.dali`) or PIL / PyAV in DataLoader workers (`pipeline.fallback`). All views
  are then rendered by the same batched torch code on the training device (`pipeline.views`).
* `state_dict()` is the stream position (samples this rank has consumed): exact resume on every
  backend, independent of workers and prefetching.
"""
from __future__ import annotations

import importlib.util
import logging
import signal
from collections import Counter
from typing import Iterator

import torch

from pipeline import params as P
from pipeline.config import DataConfig
from pipeline.fallback import CpuBatches
from pipeline.reader import ShardDataset
from pipeline.source import ClipSource
from pipeline.views import ViewSpec, render

log = logging.getLogger(__name__)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(cfg: DataConfig, fmt: str) -> str:
    """"dali" or "cpu" for a config and a dataset format, with a clear error for impossible asks."""
    on_gpu = cfg.device.startswith("cuda") and torch.cuda.is_available()
    if cfg.backend == "auto":
        return "dali" if dali_available() and on_gpu else "cpu"
    if cfg.backend == "dali":
        if not dali_available():
            raise ImportError("DataConfig.backend='dali' needs NVIDIA DALI: pip install 'densevid[gpu]' "
                              "(or use backend='cpu')")
        if fmt == "h264" and not on_gpu:
            raise ValueError(f"{cfg.path}: DALI decodes H.264 only on a GPU (its CPU decoder handles VP9 and "
                             "JPEG); use backend='cpu' (PyAV) or device='cuda'")
    return cfg.backend


class Loader:
    """Iterate for batches (dicts of tensors on `cfg.device`); see docs/design.md section 2."""

    def __init__(self, cfg: DataConfig, spec: ViewSpec, rank: int = 0, world_size: int = 1):
        self.cfg, self.spec, self.rank, self.world_size = cfg, spec, rank, world_size
        self.dataset = ShardDataset(cfg.path)
        self.source = ClipSource(self.dataset, spec, rank, world_size, cfg.seed, shuffle=cfg.shuffle_buffer != 0)
        self.backend = resolve_backend(cfg, self.dataset.format)
        self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype) if self.device.type == "cuda" else torch.float32
        self.position = 0            # stream position of the next sample this rank yields
        self.skipped: Counter[str] = Counter()
        log.info("pipeline: %s, %d usable samples, rank %d/%d reads %d per epoch, backend %s on %s",
                 cfg.path, len(self.source.usable), rank, world_size, self.epoch_length, self.backend, self.device)

    @property
    def epoch_length(self) -> int:
        """Samples this rank reads per epoch."""
        return self.source.order.epoch_length

    @property
    def epoch(self) -> int:
        return self.position // self.epoch_length

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "seed": self.cfg.seed, "rank": self.rank,
                "world_size": self.world_size, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the next iteration yields what the saved run would have."""
        if (state["seed"], state["world_size"]) != (self.cfg.seed, self.world_size):
            log.warning("resuming a stream saved with seed %s and %s ranks under seed %s and %s ranks: the "
                        "position is kept, the sample order is not the saved one",
                        state["seed"], state["world_size"], self.cfg.seed, self.world_size)
        self.position = int(state["position"])
        self.skipped = Counter(state.get("skipped", {}))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = self._dali_batches() if self.backend == "dali" else self._cpu_batches()
        for batch, skipped in batches:
            for sample_id in skipped:
                self.skipped[self.dataset.where(sample_id)] += 1
            self.position += self.cfg.batch_size
            yield batch

    def _cpu_batches(self) -> Iterator[tuple[dict, list[int]]]:
        render_here = self.device.type == "cpu"
        dataset = CpuBatches(self.source, self.cfg.batch_size, self.position, render_here, self.dtype)
        workers = self.cfg.num_workers
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=range(2 ** 62), num_workers=workers,
            prefetch_factor=self.cfg.prefetch if workers else None, pin_memory=not render_here,
            persistent_workers=False, worker_init_fn=leave_sigterm_to_the_parent)
        for item in loader:
            if render_here:
                yield item["batch"], item["skipped"]
                continue
            frames = item["frames"].to(self.device, non_blocking=True)
            yield render(frames, P.unpack(self.spec, item["params"]), self.spec, self.dtype), item["skipped"]

    def _dali_batches(self) -> Iterator[tuple[dict, list[int]]]:
        from pipeline.dali import dali_batches

        for frames, rows, skipped in dali_batches(self.source, self.cfg, self.position):
            yield render(frames, P.unpack(self.spec, rows), self.spec, self.dtype), skipped


def leave_sigterm_to_the_parent(worker_id: int) -> None:
    """Schedulers (SLURM pre-emption, `timeout`, Kubernetes) send SIGTERM to every process of a job. The
    training process answers it by checkpointing and then shuts its workers down; a torch worker that
    died first would abort the step in flight instead. (Torch workers already ignore SIGINT and exit
    on their own when the parent is gone; DALI's workers survive the signal as they are.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(data_cfg: DataConfig, views: ViewSpec, rank: int = 0, world_size: int = 1) -> Loader:
    """The batches of `views` for rank `rank` of `world_size` (docs/design.md section 2)."""
    return Loader(data_cfg, views, rank, world_size)
