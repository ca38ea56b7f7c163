"""`DataConfig`: where the shards are and how to load them (the `train` config's `data` block).

Importable without torch, so that train/run.py checks a command line before paying for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("auto", "dali", "cpu")
DTYPES = ("float32", "float16", "bfloat16")  # names of torch dtypes


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class DataConfig:
    """How `pipeline.build_loader` reads a packed dataset.

    path: dataset folder written by `shard_tools/pack.py` (shards, `.idx` files, `manifest.json`).
    batch_size: samples per batch on this rank.
    backend: "dali" decodes with DALI (nvJPEG / NVDEC on a GPU, DALI's CPU decoders without one),
        "cpu" decodes with PIL / PyAV in DataLoader workers, "auto" picks "dali" when DALI is
        installed and a GPU is visible, else "cpu".
    device: where the batches land ("cuda" or "cpu"); the views are rendered there.
    num_threads: DALI decoder threads (DALI backend).
    num_workers: reader processes (DataLoader workers on the CPU backend, DALI
        `py_num_workers` of the parallel external source on the DALI backend); 0 reads in-process.
    seed: shared by all ranks for the epoch order; augmentation is seeded per rank and sample.
    shuffle_buffer: 0 reads samples in shard order (feature extraction, debugging); any other
        value shuffles every epoch with a full permutation of the dataset, which is better than any
        buffer (random access into mmap'ed shards costs the same as sequential reads).
    dtype: "float32" (default), "float16" or "bfloat16" for the view tensors.
    prefetch: batches prepared ahead of the training step.
    """

    path: str
    batch_size: int = 32
    backend: str = "auto"
    device: str = field(default_factory=_default_device)
    num_threads: int = 4
    num_workers: int = 4
    seed: int = 0
    shuffle_buffer: int = 1024
    dtype: str = "float32"
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"DataConfig.backend={self.backend!r}: choose one of {BACKENDS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"DataConfig.dtype={self.dtype!r}: choose one of {DTYPES}")
        if self.batch_size < 1:
            raise ValueError(f"DataConfig.batch_size={self.batch_size}: must be >= 1")
        if self.num_workers < 0 or self.num_threads < 1:
            raise ValueError("DataConfig.num_workers must be >= 0 and num_threads >= 1")
