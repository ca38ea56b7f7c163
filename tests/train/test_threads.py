"""CPU threads and loader workers follow the cores a process may use."""
import torch

from pipeline.config import DataConfig
from train import threads


def test_threads_and_workers_follow_the_available_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    try:
        data = DataConfig(path="x", num_workers=8)
        line = threads.choose_cpu_threads(data, on_cpu=True, local_processes=2)
        assert torch.get_num_threads() == 2 and data.num_workers == 1
        assert line == "2 intra-op thread(s) (4 available core(s)), 1 loader worker(s)"
        gpu = DataConfig(path="x", num_workers=8)
        threads.choose_cpu_threads(gpu, on_cpu=False)
        assert gpu.num_workers == 8 and torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice is kept
        torch.set_num_threads(1)
        single = DataConfig(path="x", num_workers=2)
        assert threads.choose_cpu_threads(single, on_cpu=True).startswith("1 intra-op thread(s) (OMP_NUM_THREADS)")
        assert torch.get_num_threads() == 1 and single.num_workers == 2  # 4 cores: up to 3 workers
    finally:
        torch.set_num_threads(before)
