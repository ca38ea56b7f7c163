"""Every GPU check and benchmark of densevid in one time-boxed command, written up as one report.

    python -m train.gpu_report [--budget 480] [--out gpu-report]        # on a GPU machine
    python -m train.gpu_report --dry-run --out /tmp/gr                  # the same steps, tiny, on the CPU
    make gpu-report [BUDGET=480] [OUT=gpu-report] [DEVICE=cpu] [PYTHON=python3]

Steps, in this order, each run as its own subprocess with a timeout:
  1. environment: GPU, driver, Python, torch/CUDA/cuDNN, DALI, nvImageCodec and friends
  2. GPU tests: pytest -m gpu (DALI GPU vs CPU equality included)
  3. data pipeline: pipeline/bench.py, multicrop T=8 and T=1, grid, clip on synthetic JPEG shards,
     clip on H.264 through NVDEC, each against the baseline loader measured in the same run
  4. backbones: python -m models.bench, ViT-S/16 and ViT-B/16 against timm eager / SDPA / SDPA+compile
  5. training: train/run.py --report for every objective in train.objectives.OBJECTIVES, at the
     per-GPU batch of its YAML: samples/s, data wait, MFU, peak memory
  6. label propagation: eval/bench_label_prop.py at 480p on the ViT-S/16 and ViT-S/8 grids
  7. learning benchmark: python -m train.learning --budget gpu, with what time is left (on real video
     with --train-data SRC ... --eval-data DAVIS_DIR, passed on to it)

Time: step k must end by start + budget x (its share + the shares before it), so the time an early
step leaves unused goes to the later ones, and no step can eat the budget of all the others. A step
that times out is killed with its whole process group and the report says so; a step whose tool or
package is missing is skipped with the reason. report.md and report.json are rewritten after every
step, so a run cut short still leaves the finished steps. The exit status is 0 when every step ran
(or was skipped for a stated reason), 1 when a step failed or timed out; missed targets are marks in
the report, not errors.

--dry-run (--device cpu) runs every step at a tiny size on the CPU: it checks that the commands,
their options and the parsing of their output still fit together. Its numbers and marks say
nothing about a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
PEAK_MEMORY_LIMIT_GIB = 22.0   # what one 24 GB GPU leaves to torch after the CUDA context and fragmentation
# Overrides that make each objective's training step tiny, for the CPU dry run and the trainer's run tests
# (tests/train/test_run.py uses the same table); a new objective in OBJECTIVES needs its entry here.
DRY_RUN_OVERRIDES = {
    "crw": ["--crw.size", "32", "--crw.patch_size", "16", "--crw.patch_stride", "8", "--crw.clip_len", "3"],
    "dino": ["--model.arch", "vit_tiny_patch16", "--dino.global_size", "32", "--dino.local_size", "16",
             "--dino.local_crops", "2", "--dino.out_dim", "64", "--dino.head_hidden_dim", "32",
             "--dino.head_bottleneck_dim", "16"],
    # 3 x 3 patches (the forwarder keeps its top 5), 4 frames 4 apart in the 32-frame videos
    "timet": ["--model.arch", "vit_tiny_patch16", "--timet.size", "48", "--timet.frame_stride", "4",
              "--timet.num_prototypes", "8", "--timet.head_dims", "[16, 8]"],
    "selfpatch": ["--model.arch", "vit_tiny_patch16", "--selfpatch.global_size", "64", "--selfpatch.local_size", "48",
                  "--selfpatch.local_crops", "2", "--selfpatch.out_dim", "64", "--selfpatch.patch_out_dim", "32",
                  "--selfpatch.head_hidden_dim", "32", "--selfpatch.head_bottleneck_dim", "16"],
    "dora": ["--model.arch", "vit_tiny_patch16", "--dora.global_size", "48", "--dora.local_size", "16",
             "--dora.local_crops", "2", "--dora.frames", "3", "--dora.frame_stride", "4", "--dora.out_dim", "64",
             "--dora.head_hidden_dim", "32", "--dora.head_bottleneck_dim", "16"],
    "smtc": ["--model.arch", "vit_tiny_patch16", "--smtc.size", "32", "--smtc.num_slots", "4",
             "--smtc.num_instances", "2", "--smtc.clip_len", "3", "--smtc.frame_stride", "1",
             "--optim.backbone_frozen_steps", "0", "--optim.backbone_lr_mult", "1"],  # the encoder moves in 2 steps
    # 2 x 2 patches per local crop, 2 x 2 aligned patches per pair (sorting networks of 4)
    "neco": ["--model.arch", "vit_tiny_patch16", "--neco.global_size", "48", "--neco.local_size", "32",
             "--neco.local_crops", "2", "--neco.roi_size", "2", "--neco.proj_dim", "16", "--neco.proj_hidden_dim", "32"],
}
STAGE_HINT = "stage the GPU wheels with `bash ../shared/gpu/stage.sh` (docs/benchmarks.md)"


MODEL_VARIANTS = {  # the rows the targets need first: a time box that ends early loses the others
    "vit_small_patch16": ["timm:sdpa+compile", "ours:auto+compile", "timm:eager", "timm:sdpa", "ours:sdpa",
                          "ours:auto"],
    "vit_base_patch16": ["timm:sdpa+compile", "ours:auto+compile", "timm:eager", "timm:sdpa", "ours:auto"],
}


# ---- sizes: the only thing that differs between the GPU run and the CPU dry run -------------------

@dataclass(frozen=True)
class Sizes:
    """Every size and count the steps use, for one kind of run."""

    videos: int                       # synthetic 32-frame clips packed for steps 3 and 5
    frame_size: tuple[int, int]       # their width, height
    ours: list[str]                   # pipeline/bench.py options of our DALI rows
    ours_t1: list[str]                # ... of the T = 1 (image mode) DALI row
    baseline: list[str]               # ... of the baseline (and CPU backend) rows
    baseline_t1: list[str]
    h264: list[str]                   # ... of the H.264 clip rows (NVDEC against the baseline decoder)
    models: list[str]                 # python -m models.bench options shared by both models
    model_variants: dict[str, list[str]]   # its rows per model, those the targets need first
    models_lp: list[str]              # its label-propagation memory rows (ViT-S run only)
    train: list[str]                  # train/run.py options added to every objective
    train_batch: int | None           # per-rank batch; None: each objective's YAML value (the paper's)
    labelprop: list[tuple[str, list[str]]]   # (grid name, eval/bench_label_prop.py options)
    weights: dict[str, float] = field(default_factory=dict)


def gpu_sizes(cpus: int) -> Sizes:
    half = str(max(1, cpus // 2))
    most = str(max(1, cpus - 2))
    return Sizes(
        videos=64, frame_size=(640, 360),
        ours=["--paths", "dali", "--batch-size", "64", "--steps", "20", "--warmup", "5",
              "--workers", half, "--threads", half],
        ours_t1=["--paths", "dali", "--batch-size", "256", "--steps", "20", "--warmup", "5",
                 "--workers", half, "--threads", half],
        baseline=["--paths", "baseline", "cpu", "--batch-size", "32", "--steps", "3", "--warmup", "1",
                  "--workers", most],
        baseline_t1=["--paths", "baseline", "--batch-size", "128", "--steps", "3", "--warmup", "1",
                     "--workers", most],
        h264=["--batch-size", "32", "--steps", "6", "--warmup", "2", "--workers", half, "--threads", half],
        models=["--batch-size", "256", "--steps", "20", "--warmup", "5"], model_variants=MODEL_VARIANTS,
        models_lp=["--lp-models", "vit_small_patch16", "vit_small_patch8"],
        train=["--steps", "60", "--data.num_workers", half, "--data.num_threads", half,
               "--data.dtype", "bfloat16"], train_batch=None,
        labelprop=[("ViT-S/16, 30x52", ["--frames", "80"]), ("ViT-S/8, 60x104", ["--frames", "80", "--stride", "8"])],
    )


DRY_SIZES = Sizes(
    videos=4, frame_size=(128, 96),
    # Image mode keeps DALI's CPU decode and the 12 multi-crop views of every family to seconds.
    ours=["--paths", "dali", "--frames", "1", "--batch-size", "2", "--steps", "1", "--warmup", "0",
          "--workers", "0", "--threads", "1"],
    ours_t1=["--paths", "dali", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--workers", "0",
             "--threads", "1"],
    baseline=["--paths", "baseline", "cpu", "--frames", "1", "--batch-size", "2", "--steps", "1", "--warmup", "0",
              "--workers", "0"],
    baseline_t1=["--paths", "baseline", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--workers", "0"],
    h264=["--frames", "1", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--workers", "0", "--threads", "1"],
    # fp32: bf16 matmuls on a CPU without bf16 units are emulated, ~10x slower. No +compile rows: tracing
    # alone took minutes on a loaded 2-core CPU (and the CPU cannot check the GPU's inductor kernels).
    models=["--batch-size", "2", "--img-size", "32", "--steps", "1", "--warmup", "1", "--precision", "fp32"],
    model_variants={"vit_small_patch16": ["timm:eager", "ours:auto"], "vit_base_patch16": ["ours:auto"]},
    models_lp=["--lp-models", "vit_small_patch16", "--lp-size", "32", "32"],
    train=["--cpu", "--steps", "2", "--data.num_workers", "0"], train_batch=2,
    # Coarser grids than the real ones (the dino-style baseline fills an N x N mask in Python).
    labelprop=[("ViT-S/16 role, 7x13", ["--frames", "3", "--dim", "16", "--stride", "64", "--threads", "1"]),
               ("ViT-S/8 role, 15x26", ["--frames", "3", "--dim", "16", "--stride", "32", "--threads", "1"])],
)

# Share of the budget per step (they sum to 1); unused time of a step rolls over to the next.
SHARES = {"environment": 0.02, "gpu-tests": 0.14, "pipeline": 0.24, "models": 0.24, "train": 0.14,
          "labelprop": 0.17, "learning": 0.05}


# ---- results --------------------------------------------------------------------------------------

@dataclass
class Check:
    """One target: what was measured, what is required, and whether it was met (None: not measured)."""

    name: str
    value: float | None
    unit: str
    op: str                      # ">=", "<=" or "<"
    threshold: float

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return {">=": self.value >= self.threshold, "<=": self.value <= self.threshold,
                "<": self.value < self.threshold}[self.op]

    def row(self) -> list[str]:
        mark = {True: "pass", False: "**FAIL**", None: "not measured"}[self.passed]
        return [self.name, "–" if self.value is None else f"{number(self.value)} {self.unit}".strip(),
                f"{self.op} {number(self.threshold)} {self.unit}".strip(), mark]

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "unit": self.unit, "op": self.op,
                "threshold": self.threshold, "passed": self.passed}


@dataclass
class Run:
    """One subprocess: its command line, exit status, time and output."""

    argv: list[str]
    python: bool = True          # argv[0] is the interpreter (shown as `python`)
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    skipped: str = ""            # why it was not started

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out and not self.skipped

    @property
    def command(self) -> str:
        return shlex.join((["python"] if self.python else self.argv[:1]) + self.argv[1:])

    def status(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s (killed)"
        return "ok" if self.rc == 0 else f"failed (exit {self.rc})"

    def tail(self, lines: int = 15) -> str:
        text = (self.stdout.rstrip() + "\n" + self.stderr.rstrip()).strip().splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Section:
    """One step of the report."""

    key: str
    title: str
    status: str = "not run yet"
    seconds: float = 0.0
    runs: list[Run] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)   # caption, header, rows
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def table(self, caption: str, header: list[str], rows: list[list[Any]]) -> None:
        self.tables.append((caption, header, [["–" if v is None else str(v) for v in r] for r in rows]))

    def to_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "status": self.status, "seconds": round(self.seconds, 1),
                "commands": [{"command": r.command, "status": r.status(), "seconds": round(r.seconds, 1)}
                             for r in self.runs],
                "checks": [c.to_dict() for c in self.checks], "notes": self.notes, "data": self.data}


def number(value: float | None, digits: int = 3) -> str:
    """A readable number: thousands separators, about `digits` significant figures."""
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


# ---- running subprocesses within a time box --------------------------------------------------------

class Runner:
    """Runs commands from the repository root, each killed with its process group at its deadline."""

    MIN_SECONDS = 5.0            # a command given less than this is not started

    def __init__(self, python: str, log: Path):
        self.python, self.log = python, log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def __call__(self, args: list[str], deadline: float, python: bool = True) -> Run:
        run = Run([self.python, *args] if python else list(args), python)
        budget = deadline - time.monotonic()
        if budget < self.MIN_SECONDS:
            run.skipped = "no time left in the budget (raise --budget)"
            self._log(run)
            return run
        print(f"  $ {run.command}   (time box {budget:.0f} s)", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(run.argv, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
        try:
            run.stdout, run.stderr = proc.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            run.stdout, run.stderr = self._kill(proc)
        run.rc, run.seconds = proc.returncode, time.monotonic() - started
        print(f"    {run.status()} in {run.seconds:.1f} s", flush=True)
        self._log(run)
        return run

    @staticmethod
    def _kill(proc: subprocess.Popen) -> tuple[str, str]:
        """SIGTERM to the whole group (loader workers, DALI, torch.compile workers), SIGKILL after 10 s."""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return proc.communicate(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return "", "(output lost: the process group did not exit after SIGKILL)"

    def _log(self, run: Run) -> None:
        with open(self.log, "a") as f:
            f.write(f"\n$ {run.command}\n[{run.status()}, {run.seconds:.1f} s]\n")
            f.write(run.stdout[-20000:] + ("\n--- stderr ---\n" + run.stderr[-20000:] if run.stderr else ""))


class Clock:
    """Deadlines: step k ends by start + budget x cumulative share; sub-runs split what a step has."""

    MIN_ENVIRONMENT = 30.0

    def __init__(self, budget: float):
        self.start, self.budget = time.monotonic(), budget
        self.cumulative = {}
        total = 0.0
        for key, share in SHARES.items():
            total += share
            self.cumulative[key] = total

    def step_deadline(self, key: str) -> float:
        if key == "environment":    # importing torch takes seconds on a loaded machine: never starve it
            return self.start + min(self.budget, max(self.budget * self.cumulative[key], self.MIN_ENVIRONMENT))
        return self.start + self.budget * self.cumulative[key]

    @staticmethod
    def split(deadline: float, weights: list[float]) -> Callable[[int], float]:
        """Deadline of sub-run i of weights: it gets its weight's part of what is left when it starts."""
        def deadline_of(i: int) -> float:
            now = time.monotonic()
            return now + max(deadline - now, 0.0) * weights[i] / sum(weights[i:])
        return deadline_of


# ---- parsing the tools' output ---------------------------------------------------------------------

def json_from_stdout(text: str) -> Any:
    """The JSON document a tool printed last (pipeline/bench.py --json prints it after any log lines)."""
    start = min((i for i in (text.find("\n["), text.find("\n{")) if i >= 0), default=None)
    candidates = [text] if text.lstrip().startswith(("[", "{")) else []
    if start is not None:
        candidates.append(text[start + 1:])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return None


MEASURED_LINE = re.compile(r"^measured (\S+) (\S+) T=(\d+): ([\d.]+) clips/s$", re.M)
TEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", re.M)
MODEL_LINE = re.compile(r"^(\S+)\s+(\S+)\s+([\d.]+) img/s$", re.M)


def pipeline_rows(run: Run) -> list[dict]:
    """pipeline/bench.py rows: its --json output, or the per-row progress lines of a run cut short."""
    rows = json_from_stdout(run.stdout) if run.ok else None
    if isinstance(rows, list):
        return rows
    return [{"path": p, "family": f, "T": int(t), "clips_per_s": float(c), "partial": True}
            for p, f, t, c in MEASURED_LINE.findall(run.stderr)]


def model_rows(run: Run, json_path: Path) -> tuple[list[dict], list[dict]]:
    """models.bench training and label-propagation rows, from its --json file or its progress lines."""
    if run.ok and json_path.is_file():
        result = json.loads(json_path.read_text())
        return result["train"], result["labelprop"]
    return [{"model": m, "variant": v, "img_per_s": float(s), "mfu": None, "peak_gib": None, "note": "partial"}
            for m, v, s in MODEL_LINE.findall(run.stdout)], []


def pytest_summary(xml_path: Path) -> dict:
    """Counts, failures and grouped skip reasons from pytest's JUnit XML."""
    root = ElementTree.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = Counter()
    failures, skips = [], Counter()
    for suite in suites:
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            if outcome is None:
                counts["passed"] += 1
            elif outcome.tag == "skipped":
                counts["skipped"] += 1
                skips[(outcome.get("message") or "").split("\n")[0][:120]] += 1
            else:
                counts["failed" if outcome.tag == "failure" else "errors"] += 1
                failures.append({"test": name, "message": (outcome.get("message") or "").split("\n")[0][:200]})
    return {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["errors"],
            "skipped": counts["skipped"], "failures": failures,
            "skip_reasons": [{"reason": r, "tests": n} for r, n in skips.most_common()]}


# ---- the steps ---------------------------------------------------------------------------------------

@dataclass
class Context:
    device: str
    dry: bool
    sizes: Sizes
    work: Path
    run: Runner
    clock: Clock
    env: dict = field(default_factory=dict)
    shards: dict = field(default_factory=dict)
    learning_data: list = field(default_factory=list)   # --train-data ... --eval-data ... for step 7 (real video)

    @property
    def has_dali(self) -> bool:
        return bool(self.env.get("packages", {}).get("nvidia-dali"))


def probe_environment() -> dict:
    """What step 1 reports (run in a child process by the report, so that a wedged driver is time-boxed)."""
    import platform
    from importlib import metadata

    import torch

    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"] or "").lower(): d.version
                 for d in metadata.distributions()}

    def versions(name: str) -> str | None:
        """`name`'s version; for a name ending in '*', every distribution it begins (the CUDA-12 and
        CUDA-13 builds of DALI and its codecs have different names)."""
        found = sorted(n for n in installed if (n.startswith(name[:-1]) if name.endswith("*") else n == name))
        return ", ".join(f"{n} {installed[n]}" for n in found) or None

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            if out:
                env["driver"] = out[0].split(",")[-1].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    env["packages"] = {name.rstrip("*"): versions(name) for name in (
        "nvidia-dali*", "nvidia-nvimgcodec*", "nvidia-nvjpeg*", "timm", "decord", "av", "webdataset", "accelerate",
        "torchvision", "triton", "xformers", "nvidia-ml-py", "pytest")}
    return env


def step_environment(ctx: Context, section: Section, deadline: float) -> None:
    run = ctx.run(["-m", "train.gpu_report", "--environment"], deadline)
    section.runs.append(run)
    env = json_from_stdout(run.stdout) if run.ok else None
    if not isinstance(env, dict):
        section.status = run.status()
        section.notes.append("the environment probe failed:\n" + run.tail())
        return
    ctx.env = section.data = env
    rows = [["GPU", env.get("gpu", "none visible to torch")], ["GPUs", env.get("gpus")],
            ["compute capability", env.get("capability")], ["GPU memory (GiB)", env.get("gpu_memory_gib")],
            ["driver", env.get("driver")], ["Python", env["python"]], ["CPU cores", env["cpus"]],
            ["torch", env["torch"]], ["CUDA (torch)", env["cuda"]], ["cuDNN", env["cudnn"]]]
    rows += [[name, version or "not installed"] for name, version in env["packages"].items()]
    section.table("", ["item", "value"], rows)
    for name, what in (("nvidia-dali", "the DALI rows of step 3 and the DALI tests are skipped; " + STAGE_HINT),
                       ("nvidia-nvimgcodec", "DALI cannot build an image-decoding pipeline; " + STAGE_HINT),
                       ("timm", "the timm baseline rows of step 4 are skipped"),
                       ("decord", "the H.264 baseline decodes with PyAV instead")):
        if not env["packages"][name]:
            section.notes.append(f"{name} is not installed: {what}.")
    section.status = "ok"


def step_gpu_tests(ctx: Context, section: Section, deadline: float) -> None:
    xml = ctx.work / "pytest-gpu.xml"
    xml.unlink(missing_ok=True)
    # -v: one line per test, so a run cut short still says which tests passed or failed.
    run = ctx.run(["-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"],
                  deadline)
    section.runs.append(run)
    # pytest exits 1 when a test failed and 5 when none was selected: the step ran, the marks say the rest.
    section.status = "ok" if run.rc in (0, 1, 5) and not run.timed_out else run.status()
    if xml.is_file():
        summary = pytest_summary(xml)
    else:
        outcomes = TEST_LINE.findall(run.stdout)
        counts = Counter(outcome for _, outcome in outcomes)
        summary = {"passed": counts["PASSED"], "failed": counts["FAILED"], "errors": counts["ERROR"],
                   "skipped": counts["SKIPPED"], "partial": True, "skip_reasons": [],
                   "failures": [{"test": t, "message": "see steps.log"} for t, o in outcomes if o in ("FAILED", "ERROR")]}
        section.notes.append("pytest wrote no result file (cut short?): counts from its per-test lines\n" + run.tail())
    section.data = summary
    section.table("", ["passed", "failed", "errors", "skipped"],
                  [[summary["passed"], summary["failed"], summary["errors"], summary["skipped"]]])
    if summary["failures"]:
        section.table("Failures", ["test", "message"], [[f["test"], f["message"]] for f in summary["failures"]])
    if summary["skip_reasons"]:
        section.table("Skipped", ["reason", "tests"], [[s["reason"], s["tests"]] for s in summary["skip_reasons"]])
    section.checks.append(Check("GPU tests failing", summary["failed"] + summary["errors"], "", "<=", 0))
    if ctx.device == "cuda":
        section.checks.append(Check("GPU tests passing", summary["passed"], "", ">=", 1))


def make_shards(ctx: Context, fmt: str, deadline: float) -> Path | None:
    """Synthetic clips packed as `fmt` shards under the work folder, made once per report (and reused
    by later reports with the same sizes). Raw clips come from parallel shard_tools/synth.py runs."""
    if fmt in ctx.shards:
        return ctx.shards[fmt]
    width, height = ctx.sizes.frame_size
    data = ctx.work / f"synth-{width}x{height}-{ctx.sizes.videos}"
    out = data / fmt
    if not (out / "manifest.json").is_file():
        raw = data / "raw" / "videos"
        if not raw.is_dir():
            parts = max(1, min(ctx.sizes.videos, os.cpu_count() or 1))
            per_part = [ctx.sizes.videos // parts + (i < ctx.sizes.videos % parts) for i in range(parts)]
            procs = [subprocess.Popen([ctx.run.python, "shard_tools/synth.py", "--out", str(data / f"part{i}"),
                                       "--seed", str(i), "--videos", str(n), "--classes", "3", "--davis", "0",
                                       "--frames", "32", "--width", str(width), "--height", str(height)],
                                      cwd=REPO, env=ctx.run.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True) for i, n in enumerate(per_part)]
            failed = []
            for proc in procs:
                try:
                    _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
                except subprocess.TimeoutExpired:
                    Runner._kill(proc)
                    err = "timed out"
                if proc.returncode != 0:
                    failed.append(err.strip()[-500:])
            if failed:
                print(f"  making synthetic clips failed: {failed[0]}", flush=True)
                return None
            for i in range(parts):      # one tree, one class folder per texture, names unique per part
                for video in sorted((data / f"part{i}" / "videos").glob("*/*.mp4")):
                    (raw / video.parent.name).mkdir(parents=True, exist_ok=True)
                    video.rename(raw / video.parent.name / f"p{i:02d}-{video.name}")
                shutil.rmtree(data / f"part{i}")
        run = ctx.run(["shard_tools/pack.py", "--kind", "videos", "--src", str(raw), "--out", str(out),
                       "--format", fmt, "--fps", "25", "--short-side", str(min(width, height)),
                       "--workers", str(max(1, min(ctx.sizes.videos, os.cpu_count() or 1))), "--quiet"], deadline)
        if not run.ok:
            print(f"  packing {fmt} shards failed: {run.tail(3)}", flush=True)
            return None
    ctx.shards[fmt] = out
    return out


# The cases of the pipeline table, the data format each reads, and its clips/s target for the DALI path.
PIPELINE_CASES = {"multicrop T=8": "jpeg", "multicrop T=1": "jpeg", "grid (CRW)": "jpeg", "clip": "jpeg",
                  "clip, H.264 (NVDEC)": "h264"}
PIPELINE_TARGETS = {"multicrop T=8": (2000, "clips/s"), "multicrop T=1": (8000, "samples/s"),
                    "grid (CRW)": (1000, "clips/s")}
FAMILY_CASE = {"multicrop": "multicrop T=8", "grid": "grid (CRW)", "clip": "clip"}
SPEEDUP_TARGET, H264_SPEEDUP_TARGET = 5.0, 1.0


def step_pipeline(ctx: Context, section: Section, deadline: float) -> None:
    sizes = ctx.sizes
    if not ctx.has_dali:
        section.notes.append("DALI is not installed: only the baseline and CPU-backend rows are measured; "
                             + STAGE_HINT + ".")
    # (bench options, data format, case of its rows (None: by family), time weight). The DALI rows of
    # the three JPEG families share one process (one DALI start), as do their baselines.
    families = ["--family", "multicrop", "grid", "clip"]
    t1 = ["--family", "multicrop", "--frames", "1"]
    # DALI decodes H.264 on the GPU only (NVDEC): the dry run measures the baseline row alone.
    h264_paths = ["--paths", "baseline", *(["dali"] if ctx.has_dali and ctx.device == "cuda" else [])]
    plan = [([*families, *sizes.ours], "jpeg", None, 4.0) if ctx.has_dali else None,
            ([*families, *sizes.baseline], "jpeg", None, 4.0),
            ([*t1, *sizes.ours_t1], "jpeg", "multicrop T=1", 1.5) if ctx.has_dali else None,
            ([*t1, *sizes.baseline_t1], "jpeg", "multicrop T=1", 1.5),
            (["--family", "clip", *h264_paths, *sizes.h264], "h264", "clip, H.264 (NVDEC)", 2.0)]
    plan = [p for p in plan if p is not None]
    shard_deadline = time.monotonic() + 0.4 * (deadline - time.monotonic())
    data = {fmt: make_shards(ctx, fmt, shard_deadline) for fmt in ("jpeg", "h264")}
    deadline_of = Clock.split(deadline, [p[3] for p in plan])
    rows: list[dict] = []
    for i, (options, fmt, case, _) in enumerate(plan):
        if data[fmt] is None:
            section.notes.append(f"no {fmt} shards (making them failed or ran out of time): "
                                 f"`pipeline/bench.py {shlex.join(options)}` not run")
            continue
        run = ctx.run(["pipeline/bench.py", "--data", str(data[fmt]), *options, "--device", ctx.device, "--json"],
                      deadline_of(i))
        section.runs.append(run)
        rows += [{"case": case or FAMILY_CASE[row["family"]], "format": fmt, **row} for row in pipeline_rows(run)]
        if not run.ok:
            section.notes.append(f"`{run.command}`: {run.status()}\n" + run.tail(8))
    section.data = {"rows": rows, "shards": {k: str(v) for k, v in data.items()}}
    table = []
    for case in PIPELINE_CASES:
        of_case = [r for r in rows if r["case"] == case]
        base = next((r["clips_per_s"] for r in of_case if r["path"] == "baseline"), None)
        ours = next((r["clips_per_s"] for r in of_case if r["path"] == "dali"), None)
        for r in of_case:
            table.append([case, r["path"], r.get("decoder"), r.get("T"), r.get("batch"), number(r["clips_per_s"]),
                          number(r.get("frames_per_s")), r.get("cpu_ms_per_clip"), r.get("gpu_pct"),
                          r.get("nvdec_pct"), r.get("nvjpg_pct"),
                          f"{ratio(r['clips_per_s'], base)}x" if base and r["path"] != "baseline" else "–",
                          "partial (cut short)" if r.get("partial") else ""])
        if case in PIPELINE_TARGETS:
            threshold, unit = PIPELINE_TARGETS[case]
            section.checks.append(Check(f"pipeline {case}, DALI", ours, unit, ">=", threshold))
        target = H264_SPEEDUP_TARGET if PIPELINE_CASES[case] == "h264" else SPEEDUP_TARGET
        section.checks.append(Check(f"pipeline {case}, DALI vs baseline", ratio(ours, base), "x", ">=", target))
    section.table("Rows of one case read the same shards and build the same views; 'vs baseline' divides by the "
                  "baseline row of the same case, measured in this run. Utilisation: pynvml or nvidia-smi.",
                  ["case", "path", "decoder", "T", "batch", "clips/s", "frames/s", "CPU ms/clip", "GPU %",
                   "NVDEC %", "NVJPG %", "vs baseline", "note"], table)
    section.status = "ok" if all(r.ok for r in section.runs) and all(data.values()) else "failed"


def step_models(ctx: Context, section: Section, deadline: float) -> None:
    if not ctx.env.get("packages", {}).get("timm"):
        section.notes.append("timm is not installed: its rows say skipped, and the 1.1x target is not measured.")
    deadline_of = Clock.split(deadline, [3.0, 2.0])
    train, labelprop = [], []
    for i, (model, variants) in enumerate(ctx.sizes.model_variants.items()):
        out = ctx.work / f"models-{model}.json"
        out.unlink(missing_ok=True)
        run = ctx.run(["-m", "models.bench", "--models", model, "--variants", *variants, *ctx.sizes.models,
                       *(ctx.sizes.models_lp if i == 0 else ["--lp-models"]), "--device", ctx.device,
                       "--json", str(out)], deadline_of(i))
        section.runs.append(run)
        rows, lp = model_rows(run, out)
        train += rows
        labelprop += lp
        if not run.ok:
            section.notes.append(f"`{run.command}`: {run.status()}\n" + run.tail(8))
    section.data = {"train": train, "labelprop": labelprop}
    table = []
    for model in MODEL_VARIANTS:
        speed = {r["variant"]: r["img_per_s"] for r in train if r["model"] == model}
        for r in (r for r in train if r["model"] == model):
            table.append([model, r["variant"], number(r["img_per_s"]),
                          *(f"{ratio(r['img_per_s'], speed.get(b))}x" if speed.get(b) and r["img_per_s"] else "–"
                            for b in ("timm:eager", "timm:sdpa", "timm:sdpa+compile")),
                          None if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %",
                          None if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}", r.get("note") or ""])
        if model == "vit_small_patch16":
            section.checks.append(Check("ViT-S/16 ours:auto+compile vs timm:sdpa+compile",
                                        ratio(speed.get("ours:auto+compile"), speed.get("timm:sdpa+compile")),
                                        "x", ">=", 1.1))
    settings = " ".join(ctx.sizes.models)
    section.table(f"Forward + backward (models.bench {settings}; bf16 autocast unless --precision says otherwise); ratios against the timm rows of this run.",
                  ["model", "variant", "img/s", "vs timm eager", "vs timm SDPA", "vs timm SDPA+compile", "MFU",
                   "peak GiB", "note"], table)
    if labelprop:
        section.table("Label-propagation memory, one frame, no_grad (models.bench --lp-models)",
                      ["model", "backend", "last-block attention maps", "peak GiB", "largest tensor MiB"],
                      [[r["model"], r["backend"], "yes" if r["attention_maps"] else "no",
                        None if r["peak_gib"] is None else f"{r['peak_gib']:.3f}", f"{r['largest_tensor_mib']:.1f}"]
                       for r in labelprop])
    section.status = "ok" if all(r.ok for r in section.runs) else "failed"


def step_train(ctx: Context, section: Section, deadline: float) -> None:
    from train.config import load_config
    from train.objectives import OBJECTIVES
    from train.rundir import read_log

    methods = sorted(OBJECTIVES)
    data = make_shards(ctx, "jpeg", time.monotonic() + 0.3 * (deadline - time.monotonic()))
    if data is None:
        section.status = "failed"
        section.notes.append("no JPEG shards to train on (making them failed or ran out of time)")
        return
    deadline_of = Clock.split(deadline, [1.0] * len(methods))
    table, results = [], {}
    for i, method in enumerate(methods):
        # the per-GPU batch of train/configs/<method>.yaml
        paper_batch = load_config(method, overrides={"data.path": str(data)}).data.batch_size
        batch = ctx.sizes.train_batch or paper_batch
        out = ctx.work / "train" / method
        shutil.rmtree(out, ignore_errors=True)
        run = ctx.run(["train/run.py", "--method", method, "--data", str(data), "--out", str(out), "--report",
                       "--data.batch_size", str(batch), *ctx.sizes.train,
                       *(DRY_RUN_OVERRIDES.get(method, []) if ctx.dry else [])], deadline_of(i))
        section.runs.append(run)
        report_file = out / "throughput.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else None
        if report is None and (out / "log.jsonl").is_file():   # cut short: the last logged window
            last = (read_log(out) or [{}])[-1]
            report = {"samples_per_s": last.get("samples_per_s"), "data_wait_pct": last.get("data_wait_pct"),
                      "peak_memory_gib": last.get("memory_gib"), "partial": True}
        results[method] = {"batch": batch, "paper_batch": paper_batch, "command": run.command,
                           "status": run.status(), "report": report}
        report = report or {}
        table.append([method, batch if batch == paper_batch else f"{batch} (YAML: {paper_batch})",
                      number(report.get("samples_per_s")),
                      number(report.get("step_ms")),
                      None if report.get("data_wait_pct") is None else f"{report['data_wait_pct']:.2f} %",
                      None if report.get("mfu_pct") is None else f"{report['mfu_pct']:.1f} %",
                      None if report.get("peak_memory_gib") is None else f"{report['peak_memory_gib']:.2f}",
                      run.status() + (" (from log.jsonl)" if report.get("partial") else "")])
        section.checks.append(Check(f"{method}: data wait", report.get("data_wait_pct"), "%", "<", 3.0))
        section.checks.append(Check(f"{method}: peak memory at batch {batch}", report.get("peak_memory_gib"),
                                    "GiB", "<=", PEAK_MEMORY_LIMIT_GIB))
        if not run.ok:
            section.notes.append(f"`{run.command}`: {run.status()}\n" + run.tail(8))
        if ctx.dry and method not in DRY_RUN_OVERRIDES:
            section.notes.append(f"{method} has no tiny settings in DRY_RUN_OVERRIDES (train/gpu_report.py): "
                                 "it ran at its defaults")
    section.data = results
    memory = "peak RSS on the CPU" if ctx.dry else "torch.cuda.max_memory_allocated"
    section.table(f"Every objective of train.objectives.OBJECTIVES at the per-GPU batch of its YAML; peak memory: "
                  f"{memory}; the {PEAK_MEMORY_LIMIT_GIB:g} GiB limit is the 'fits one 24 GB GPU' check.",
                  ["objective", "per-GPU batch", "samples/s", "step ms", "data wait", "MFU", "peak GiB", "status"],
                  table)
    section.status = "ok" if all(r.ok for r in section.runs) else "failed"


def step_labelprop(ctx: Context, section: Section, deadline: float) -> None:
    deadline_of = Clock.split(deadline, [1.0, 2.0])
    table, results = [], []
    for i, (grid, options) in enumerate(ctx.sizes.labelprop):
        out = ctx.work / f"labelprop-{i}.json"
        out.unlink(missing_ok=True)
        run = ctx.run(["eval/bench_label_prop.py", "--device", ctx.device, *options, "--json", str(out)],
                      deadline_of(i))
        section.runs.append(run)
        rows = json.loads(out.read_text())["rows"] if run.ok and out.is_file() else []
        agreement = re.search(r"pixel agreement between the two: ([\d.]+)", run.stdout)
        by_name = {r["name"]: r for r in rows}
        speedup = ratio(by_name.get("densevid", {}).get("frames_per_second"),
                        by_name.get("dino-style", {}).get("frames_per_second"))
        results.append({"grid": grid, "command": run.command, "status": run.status(), "rows": rows,
                        "pixel_agreement": float(agreement.group(1)) if agreement else None, "speedup": speedup})
        for r in rows:
            table.append([grid, r["name"], number(r["frames_per_second"]), number(r["peak_mib"]),
                          f"{r['peak_mib_above_start']:+,.0f}", f"{speedup}x" if r["name"] == "densevid" else "1.0x",
                          agreement.group(1) if agreement else None])
        if not rows:
            table.append([grid, "–", None, None, None, None, run.status()])
            section.notes.append(f"`{run.command}`: {run.status()}\n" + run.tail(8))
        section.checks.append(Check(f"label propagation {grid} vs DINO's script", speedup, "x", ">=", 10.0))
    section.data = {"grids": results}
    section.table("DINO protocol at 480p on synthetic features (backbone excluded, the same for both); "
                  "'dino-style' is DINO's eval_video_segmentation.py algorithm, re-implemented.",
                  ["grid", "implementation", "frames/s", "peak MiB", "MiB during the run", "speed-up",
                   "pixel agreement"], table)
    section.status = "ok" if all(r.ok for r in section.runs) else "failed"


def step_learning(ctx: Context, section: Section, deadline: float) -> None:
    if not (REPO / "train" / "learning.py").is_file():
        section.status = "skipped: train/learning.py is not in this tree yet (the learning benchmark has not landed)"
        return
    if ctx.dry:   # it trains for minutes: the dry run checks that its entry point and options are there
        run = ctx.run(["-m", "train.learning", "--help"], deadline)
        section.runs.append(run)
        missing = [flag for flag in ("--budget", "--out") if flag not in run.stdout]
        section.status = run.status() if not run.ok else (
            f"failed: `python -m train.learning --help` lists no {', '.join(missing)}" if missing else "ok")
        section.notes.append("dry run: only `python -m train.learning --help` was run (it trains for minutes); "
                             "on the GPU this step runs `python -m train.learning --budget gpu --out DIR`.")
        return
    out = ctx.work / "learning"
    shutil.rmtree(out, ignore_errors=True)
    run = ctx.run(["-m", "train.learning", "--budget", "gpu", *ctx.learning_data, "--out", str(out)], deadline)
    section.runs.append(run)
    section.status = run.status()
    results = {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted(out.glob("*.json"))[:8]} \
        if out.is_dir() else {}
    section.data = {"results": results, "output_tail": run.tail(30)}
    rows = [[name, key, json.dumps(value)[:80]] for name, result in results.items() if isinstance(result, dict)
            for key, value in list(result.items())[:30] if not isinstance(value, (dict, list))]
    if rows:
        section.table("Top-level values of the JSON files the benchmark wrote", ["file", "key", "value"], rows)
    section.notes.append("output (last lines):\n" + run.tail(20))


STEPS: list[tuple[str, str, Callable[[Context, Section, float], None]]] = [
    ("environment", "1. Environment", step_environment),
    ("gpu-tests", "2. GPU tests (pytest -m gpu)", step_gpu_tests),
    ("pipeline", "3. Data pipeline (pipeline/bench.py)", step_pipeline),
    ("models", "4. Backbones (python -m models.bench)", step_models),
    ("train", "5. Training throughput (train/run.py --report)", step_train),
    ("labelprop", "6. Label propagation (eval/bench_label_prop.py)", step_labelprop),
    ("learning", "7. Learning benchmark (python -m train.learning --budget gpu)", step_learning),
]


# ---- the report -------------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(value: str) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")
    return ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def render(meta: dict, sections: list[Section]) -> str:
    lines = [f"# densevid GPU report ({'CPU dry run' if meta['dry_run'] else meta['device']})", ""]
    if meta["dry_run"]:
        lines += ["**CPU dry run**: every step at a tiny size on the CPU. It checks that the commands and the "
                  "parsing of their output fit together; its numbers and marks say nothing about a GPU.", ""]
    lines += [f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- git: {meta['git']}",
              f"- command: `{meta['command']}`",
              f"- budget: {meta['budget_s']:.0f} s; used: {meta['elapsed_s']:.0f} s", "",
              "## Targets", ""]
    checks = [c for s in sections for c in s.checks]
    lines += markdown_table(["target", "measured", "required", "mark"], [c.row() for c in checks]) if checks else \
        ["(no step has finished yet)"]
    for s in sections:
        lines += ["", f"## {s.title}", "", f"status: {s.status}; {s.seconds:.0f} s", ""]
        if s.runs:
            lines += ["```"] + [f"{r.command}    # {r.status()}, {r.seconds:.0f} s" for r in s.runs] + ["```", ""]
        for caption, header, rows in s.tables:
            if caption:
                lines += [caption, ""]
            lines += markdown_table(header, rows) + [""]
        if s.checks:
            lines += markdown_table(["target", "measured", "required", "mark"], [c.row() for c in s.checks]) + [""]
        for note in s.notes:
            head, _, rest = note.partition("\n")
            lines += [f"- {head}"] + (["", "```", rest, "```"] if rest else []) + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out: Path, meta: dict, sections: list[Section]) -> None:
    meta = {**meta, "elapsed_s": time.monotonic() - meta["started"]}
    report = {**{k: v for k, v in meta.items() if k != "started"},
              "targets": [c.to_dict() for s in sections for c in s.checks], "steps": [s.to_dict() for s in sections]}
    for name, text in (("report.md", render(meta, sections)), ("report.json", json.dumps(report, indent=1) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + (" (uncommitted changes)" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.gpu_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=480, help="seconds for all steps together (default: 480)")
    parser.add_argument("--out", default="gpu-report", help="folder for report.md, report.json and steps.log "
                                                            "(default: gpu-report; on the device: $OUT)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: the real run; cpu: the dry run (same as --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="every step at a tiny size on the CPU")
    parser.add_argument("--work", default=None, help="folder for shards, runs and raw results, kept for reuse "
                                                     "(default: <tmp>/densevid-gpu-report[-dry]); never under --out, "
                                                     "which must stay small for the device tool to bring back")
    parser.add_argument("--only", nargs="+", choices=[key for key, _, _ in STEPS], default=None,
                        help="run only these steps (the environment is always probed); the others' time goes "
                             "to them, e.g. --only models train to repeat two steps")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the steps (default: this one)")
    parser.add_argument("--train-data", nargs="+", metavar="SRC", default=[],
                        help="step 7 trains on these real inputs (python -m train.learning --train-data) ...")
    parser.add_argument("--eval-data", metavar="DAVIS_DIR", help="... and scores these DAVIS sequences (--eval-data)")
    parser.add_argument("--environment", action="store_true", help="print step 1's environment probe as JSON and exit")
    args = parser.parse_args(argv)
    args.dry_run = args.dry_run or args.device == "cpu"
    args.device = "cpu" if args.dry_run else "cuda"
    if not args.budget > 0:
        parser.error(f"--budget {args.budget:g}: give the seconds all steps may take together, e.g. --budget 480")
    if bool(args.train_data) != bool(args.eval_data):
        parser.error("--train-data and --eval-data go together (step 7 on real video)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.environment:
        print(json.dumps(probe_environment()))
        return 0
    out = Path(args.out)
    work = Path(args.work or Path(os.environ.get("TMPDIR", "/tmp")) /
                ("densevid-gpu-report-dry" if args.dry_run else "densevid-gpu-report"))
    if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
        print(f"error: --work {work} is inside --out {out}: keep it elsewhere (the device tool brings back at "
              "most 8 files from $OUT)", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create {err.filename}: {err.strerror}; pass a writable --out / --work", file=sys.stderr)
        return 2
    (out / "steps.log").write_text("")
    runner = Runner(args.python, out / "steps.log")
    clock = Clock(args.budget)
    sizes = DRY_SIZES if args.dry_run else gpu_sizes(os.cpu_count() or 1)
    ctx = Context(args.device, args.dry_run, sizes, work, runner, clock,
                  learning_data=["--train-data", *args.train_data, "--eval-data", args.eval_data] if args.eval_data else [])
    import platform
    meta = {"dry_run": args.dry_run, "device": args.device, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.node()}, {os.cpu_count()} CPU cores", "git": git_revision(),
            "command": shlex.join(["python", "-m", "train.gpu_report", *(argv if argv is not None else sys.argv[1:])]),
            "budget_s": args.budget, "started": clock.start}
    sections = [Section(key, title) for key, title, _ in STEPS]
    for (key, title, step), section in zip(STEPS, sections):
        deadline = clock.step_deadline(key)
        print(f"[{title}] until +{deadline - clock.start:.0f} s of {args.budget:.0f} s", flush=True)
        started = time.monotonic()
        if args.only and key not in args.only and key != "environment":
            section.status = f"skipped: not among --only {' '.join(args.only)}"
        elif deadline - started < Runner.MIN_SECONDS:
            section.status = "skipped: no time left in the budget (raise --budget)"
        else:
            try:
                step(ctx, section, deadline)
            except Exception as err:  # noqa: BLE001  (one step's bug must not cost the other steps' numbers)
                section.status = f"failed: {type(err).__name__}: {err}"
                print(f"  {section.status}", flush=True)
        section.seconds = time.monotonic() - started
        if key == "environment" and section.status == "ok":
            if args.device == "cuda" and not ctx.env.get("cuda_available"):
                print("error: torch sees no CUDA GPU here; `make gpu-report DEVICE=cpu` (or --dry-run) runs the "
                      "CPU dry run", file=sys.stderr)
                return 2
            meta["machine"] = f"{ctx.env.get('gpu', 'no GPU')}, {ctx.env['cpus']} CPU cores, {meta['machine']}"
        write_report(out, meta, sections)
    write_report(out, meta, sections)
    print(f"report: {out / 'report.md'} and {out / 'report.json'} ({time.monotonic() - clock.start:.0f} s)")
    failed = [s.title for s in sections if not (s.status == "ok" or s.status.startswith("skipped"))]
    if failed:
        print("steps that did not finish: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
