"""CPU threads of a training process, chosen from the cores it may actually use.

torch's default intra-op pool is one thread per *machine* core, and every DataLoader worker adds a
process: on a shared or container-limited machine that oversubscribes the cores (DINO trained ~10x
slower on a loaded 2-core machine with the defaults than with OMP_NUM_THREADS=1). The cores counted
are the process's CPU affinity (``os.sched_getaffinity``: taskset, cgroup cpusets) shared by the
processes of this node; ``OMP_NUM_THREADS``, when set, is the user's choice and is kept.
"""
from __future__ import annotations

import os

import torch

from pipeline.config import DataConfig


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def choose_cpu_threads(data: DataConfig, on_cpu: bool, local_processes: int = 1) -> str:
    """Set torch's intra-op threads and cap ``data.num_workers`` for this node; return what was chosen
    (for the start-up line).

    Each of the node's ``local_processes`` ranks gets an equal share of the cores. Training on the CPU,
    loader workers compete with the step for those cores: at most share - 1 of them (0, reading
    in-process, when the share is one core). On a GPU the workers keep their configured count.
    """
    cores = available_cores()
    share = max(cores // max(local_processes, 1), 1)
    if os.environ.get("OMP_NUM_THREADS"):
        threads, source = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        threads, source = share, f"{cores} available core(s)"
        torch.set_num_threads(threads)
    if on_cpu and data.num_workers > share - 1:
        data.num_workers = share - 1
    return f"{threads} intra-op thread(s) ({source}), {data.num_workers} loader worker(s)"
