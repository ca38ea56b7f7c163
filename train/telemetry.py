"""What a run tells its user: TensorBoard, log.jsonl, a progress bar, versions and throughput."""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) for the MFU denominator, keyed by a device-name fragment.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def collect_versions(repo_root: Path) -> dict[str, str | None]:
    """Python, torch, CUDA, DALI and friends, plus the git revision of the code that ran."""
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "dali": version("nvidia-dali-cuda120"), "accelerate": version("accelerate"),
        "torchvision": version("torchvision"), "numpy": version("numpy"),
        "git": git("rev-parse", "HEAD"), "git_dirty": None if dirty is None else str(bool(dirty)),
        "host": platform.node(), "command": " ".join(sys.argv),
    }


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, when known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def available_memory_bytes() -> int | None:
    """Memory the kernel can give this process now (Linux MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def step_memory_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], batch_size: int) -> tuple[int, int]:
    """(bytes per sample, fixed bytes) of one training step, measured on a copy of ``model``: the
    tensors autograd saves for the backward of a one-sample forward, and weights + gradients + AdamW's
    two moments. The copy and a forked RNG keep the run's own state untouched."""
    import copy

    saved: dict[tuple[int, tuple], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[(tensor.data_ptr(), tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    probe = copy.deepcopy(model)
    one = {k: v[:1] for k, v in batch.items()}
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        probe(one)
    fixed = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(saved.values()), fixed


class Throughput:
    """Per-step wall time and the share of it spent waiting for the loader."""

    def __init__(self, samples_per_step: int, skip_steps: int) -> None:
        self.samples_per_step, self.skip = samples_per_step, skip_steps
        self.steps = 0
        self.step_time = self.data_time = 0.0
        self.window_time = self.window_data = 0.0
        self.window_steps = 0

    def add(self, step_time: float, data_time: float) -> None:
        self.window_time += step_time
        self.window_data += data_time
        self.window_steps += 1
        self.steps += 1
        if self.steps > self.skip:  # the first steps pay for compilation, cudnn autotuning, prefetch
            self.step_time += step_time
            self.data_time += data_time

    def window(self) -> dict[str, float]:
        """samples/s and data-wait share since the previous call."""
        out = {"samples_per_s": self.samples_per_step * self.window_steps / max(self.window_time, 1e-9),
               "data_wait_pct": 100 * self.window_data / max(self.window_time, 1e-9)}
        self.window_time = self.window_data = 0.0
        self.window_steps = 0
        return out

    def summary(self) -> dict[str, float]:
        measured = max(self.steps - self.skip, 0)
        return {"measured_steps": measured,
                "step_ms": 1000 * self.step_time / max(measured, 1),
                "samples_per_s": self.samples_per_step * measured / max(self.step_time, 1e-9),
                "data_wait_pct": 100 * self.data_time / max(self.step_time, 1e-9)}


class Telemetry:
    """TensorBoard events, one JSON line per logged step and a progress bar (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        # On resume, records written after the checkpoint (by the run that was interrupted) are dropped
        # from both logs, so every step appears once.
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step or None)
        log_path = Path(run_dir) / "log.jsonl"
        if log_path.is_file():
            kept = [line for line in log_path.read_text().splitlines(keepends=True)
                    if json.loads(line)["step"] <= start_step]
            log_path.write_text("".join(kept))
        self.jsonl = open(log_path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=None)  # disable=None: no bar when stderr is not a terminal

    def step(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()
        shown = {k: f"{scalars[k]:.4g}" for k in ("loss", "lr", "samples_per_s", "data_wait_pct") if k in scalars}
        if self.bar.disable:  # stderr is not a terminal (a log file, a pipe): one progress line per log step
            print(f"step {step}/{self.bar.total} | " + " | ".join(f"{k} {v}" for k, v in shown.items()), flush=True)
        else:
            self.bar.set_postfix(shown, refresh=False)

    def print(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
            self.bar.close()
