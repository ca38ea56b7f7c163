"""A first-in-first-out memory of feature rows from every rank, saved with the run's checkpoints.

TimeT (``--timet.queue_size``) adds past batches' rows to the Sinkhorn problem so that the cluster
balance is taken over more samples than one batch holds. Every rank pushes its rows; the rows of all
ranks are gathered first, so every rank holds the same queue and the same targets follow. The queue
is made of buffers, so it travels with the objective's state dict into checkpoints and a resumed run
continues with exactly the rows it had.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class FeatureQueue(nn.Module):
    """FIFO of ``size`` rows of width ``dim``; the newest rows overwrite the oldest."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"FeatureQueue needs a positive size, got {size}")
        self.register_buffer("rows", torch.zeros(size, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # rows pushed so far, all ranks
        self.size = size

    @property
    def full(self) -> bool:
        return int(self.count) >= self.size

    def contents(self) -> torch.Tensor:
        """The rows held, oldest first: (min(count, size), dim)."""
        filled = min(int(self.count), self.size)
        start = int(self.count) % self.size if self.full else 0
        return torch.roll(self.rows, -start, dims=0)[:filled]

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        """Append this rank's ``rows`` (n, dim), gathered in rank order from every rank."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, rows.contiguous())
            rows = torch.cat(gathered)
        pushed = len(rows)
        rows = rows.detach().to(self.rows.dtype)[-self.size:]  # more rows than the queue holds: the newest
        first = int(self.count) + pushed - len(rows)
        slots = (first + torch.arange(len(rows), device=self.rows.device)) % self.size
        self.rows[slots] = rows
        self.count += pushed
