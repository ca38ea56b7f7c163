"""Data-loading throughput: our pipeline per view family against the loader a user would write.

    python pipeline/bench.py --data DIR [--family multicrop grid clip] [--paths dali cpu baseline] [--json]
    python pipeline/bench.py --synth 640x360 --family multicrop --frames 1     # packs synthetic shards first

Paths, on the same shards and the same views:
  dali      our pipeline, DALI backend (nvJPEG / NVDEC on a GPU; DALI's CPU decoders without one),
            views rendered on the training device
  cpu       our pipeline, CPU backend (PIL / PyAV in DataLoader workers), views rendered in the workers
  baseline  what a user would otherwise write: a torch DataLoader with N workers, each decoding the
            clip's T frames (PIL for JPEG frames; decord for video, or PyAV when decord is absent:
            the table says which) and building the same views with torchvision.transforms.v2

Reported per row: clips/s, frames/s (clips x T), CPU % (this process and its worker processes, of
one core: 1600 % = 16 busy cores), CPU milliseconds per clip (the work, independent of how many cores
the machine lends: the number to compare on a shared machine), GPU %, NVDEC % and NVJPG % (pynvml or
nvidia-smi when present), and the speed-up in clips/s over the baseline row of the same family. Families use the objectives' defaults:
multicrop = DINO 2 x 224 + 10 x 96 (T = 8 at stride 4; --frames 1 for image mode), grid = CRW 256 px,
7 x 7 patches of 64 (T = 4), clip = TimeT/SMTC 224 (T = 8).
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import ClipViews, DataConfig, GridViews, MulticropViews, ViewSpec, build_loader  # noqa: E402
from pipeline.views import CropViews  # noqa: E402
from pipeline.fallback import decode_jpeg, decode_video  # noqa: E402
from pipeline.reader import ShardDataset, frame_member  # noqa: E402
from pipeline.sampling import clip_span  # noqa: E402

FAMILIES = {
    "multicrop": MulticropViews(frames=8, stride=4, global_crops=2, global_size=224, global_scale=(0.4, 1.0),
                                local_crops=10, local_size=96, local_scale=(0.05, 0.4)),
    "grid": GridViews(frames=4, stride=4, size=256, scale=(0.8, 0.95), ratio=(0.7, 1.3)),
    "clip": ClipViews(frames=8, stride=4, size=224),
}


# ---- measurement ---------------------------------------------------------------------------------

def process_tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and all its live descendants (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, times = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(pid, 0.0) for pid in tree)


def nvml_device_id(index: int, visible: str | None) -> int | str:
    """The NVML / nvidia-smi id of torch's CUDA device `index`: NVML numbers every GPU of the machine
    and ignores CUDA_VISIBLE_DEVICES, so with CUDA_VISIBLE_DEVICES=5 torch's cuda:0 is NVML's 5."""
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if index >= len(entries):
        return index
    return int(entries[index]) if entries[index].isdigit() else entries[index]   # an index or a UUID


class GpuMonitor:
    """Samples GPU, NVDEC and NVJPG utilisation every 100 ms in a thread (pynvml, else nvidia-smi)."""

    def __init__(self, device_index: int | str = 0):
        self.samples: list[tuple[float | None, float | None, float | None]] = []
        self._stop = threading.Event()
        self._read = self._pynvml_reader(device_index) or self._smi_reader(device_index)
        self._thread = threading.Thread(target=self._run, daemon=True) if self._read else None

    @staticmethod
    def _pynvml_reader(index):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = (pynvml.nvmlDeviceGetHandleByUUID(index) if isinstance(index, str)
                      else pynvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:                      # not installed, or no driver
            return None

        def read():
            jpeg = None
            if hasattr(pynvml, "nvmlDeviceGetJpgUtilization"):
                try:
                    jpeg = pynvml.nvmlDeviceGetJpgUtilization(handle)[0]
                except pynvml.NVMLError:
                    pass
            return (pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    pynvml.nvmlDeviceGetDecoderUtilization(handle)[0], jpeg)
        return read

    @staticmethod
    def _smi_reader(index):
        if shutil.which("nvidia-smi") is None:
            return None
        for fields in ("utilization.gpu,utilization.decoder,utilization.jpeg", "utilization.gpu,utilization.decoder"):
            cmd = ["nvidia-smi", f"--id={index}", f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                def read(cmd=cmd):
                    out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().split(",")
                    values = [float(v) if v.strip().replace(".", "").isdigit() else None for v in out]
                    return tuple(values + [None] * (3 - len(values)))
                return read
        return None

    def _run(self):
        while not self._stop.wait(0.1):
            self.samples.append(self._read())

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def means(self) -> dict[str, float | None]:
        out = {}
        for i, name in enumerate(("gpu_pct", "nvdec_pct", "nvjpg_pct")):
            values = [s[i] for s in self.samples if s[i] is not None]
            out[name] = round(float(np.mean(values)), 1) if values else None
        return out


def measure(batches, steps: int, warmup: int, clips_per_batch: int, frames: int, device: torch.device) -> dict:
    """Throughput of `steps` batches after `warmup` batches (worker start-up excluded)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu0, t0 = process_tree_cpu_seconds(), time.perf_counter()
    gpu = (nvml_device_id(torch.cuda.current_device() if device.index is None else device.index,
                          os.environ.get("CUDA_VISIBLE_DEVICES")) if device.type == "cuda" else -1)
    with GpuMonitor(gpu) as monitor:
        for _ in range(steps):
            next(it)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    cpu = process_tree_cpu_seconds() - cpu0
    clips = steps * clips_per_batch
    return {"clips_per_s": round(clips / wall, 1), "frames_per_s": round(clips * frames / wall, 1),
            "cpu_pct": round(100 * cpu / wall), "cpu_ms_per_clip": round(1000 * cpu / clips, 1),
            **monitor.means(), "seconds": round(wall, 2)}


# ---- the loader a user would otherwise write -----------------------------------------------------

def baseline_decoder() -> str:
    try:
        import decord  # noqa: F401
        return "decord"
    except ImportError:
        return "pyav"


class BaselineClips(torch.utils.data.Dataset):
    """Per-sample decode of the T frames, then torchvision v2 views: the usual video SSL loader."""

    def __init__(self, path: str, spec: ViewSpec):
        self.dataset, self.spec = ShardDataset(path), spec
        self.usable = self.dataset.usable(clip_span(spec.frames, spec.stride))
        self.views = BASELINE_VIEWS[type(spec)](spec)

    def __len__(self) -> int:
        return len(self.usable)

    def _frames(self, sample_id: int, indices: np.ndarray) -> torch.Tensor:
        ds = self.dataset
        if ds.format == "jpeg":
            frames = np.stack([decode_jpeg(ds.array(sample_id, frame_member(int(i)))) for i in indices])
        elif baseline_decoder() == "decord":
            import decord

            reader = decord.VideoReader(io.BytesIO(ds.member(sample_id, ds.video_ext(sample_id))))
            frames = reader.get_batch(indices.tolist()).asnumpy()
        else:
            frames = decode_video(ds.array(sample_id, ds.video_ext(sample_id)), indices)
        return torch.from_numpy(frames).permute(0, 3, 1, 2)

    def __getitem__(self, i: int) -> dict:
        from torchvision import tv_tensors

        spec, sample_id = self.spec, int(self.usable[i])
        start = np.random.randint(0, self.dataset.nframes(sample_id) - clip_span(spec.frames, spec.stride) + 1)
        video = tv_tensors.Video(self._frames(sample_id, start + spec.stride * np.arange(spec.frames)))
        video = video.float().div_(255)
        return {"label": self.dataset.label(sample_id), **self.views(video)}


def _crop_views(spec: CropViews, groups: list[tuple[str, int, tuple[float, float], int]]):
    """The views of a `CropViews` family as torchvision pipelines: groups of (batch key, output side,
    scale, count), each view with DINO-style colour at the family's blur and solarize probabilities."""
    from torchvision.transforms import v2

    p_blur, p_solar = (p[:, 0].tolist() for p in spec.color_probabilities())
    views, at = {}, 0
    for name, size, scale, count in groups:
        if count:
            views[name] = [v2.Compose([
                v2.RandomResizedCrop(size, scale, spec.ratio, antialias=True), v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(*spec.jitter_strength)], p=0.8), v2.RandomGrayscale(0.2),
                v2.RandomApply([v2.GaussianBlur(13, sigma=(0.1, 2.0))], p=p_blur[at + i]),
                v2.RandomSolarize(0.5, p=p_solar[at + i]), v2.Normalize(spec.mean, spec.std)]) for i in range(count)]
        at += count
    return lambda video: {name: torch.stack([t(video) for t in transforms]) for name, transforms in views.items()}


def _clip_views(spec: ClipViews):
    views = _crop_views(spec, [("clip", spec.size, spec.scale, 1)])
    return lambda video: {"clip": views(video)["clip"][0]}


def _multicrop_views(spec: MulticropViews):
    return _crop_views(spec, [("global", spec.global_size, spec.global_scale, spec.global_crops),
                              ("local", spec.local_size, spec.local_scale, spec.local_crops)])


def _grid_views(spec: GridViews):
    from torchvision.transforms import v2

    frame = v2.RandomResizedCrop(spec.size, spec.scale, spec.ratio, antialias=True)
    patch = v2.Compose([v2.RandomResizedCrop(spec.patch_size, spec.patch_scale, antialias=True),
                        v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(*spec.jitter_strength)], p=1.0),
                        v2.Normalize(spec.mean, spec.std)])

    def apply(video):
        frames = frame(video)                                                    # (T, 3, 256, 256)
        P, S = spec.patch_size, spec.patch_stride
        cells = frames.unfold(2, P, S).unfold(3, P, S).permute(0, 2, 3, 1, 4, 5).reshape(spec.frames, -1, 3, P, P)
        return {"patches": torch.stack([torch.stack([patch(p) for p in frame_cells]) for frame_cells in cells])}
    return apply


BASELINE_VIEWS = {ClipViews: _clip_views, MulticropViews: _multicrop_views, GridViews: _grid_views}


# ---- runs ----------------------------------------------------------------------------------------

def run_path(path_name: str, data: str, spec: ViewSpec, args, device: torch.device) -> dict:
    if path_name == "baseline":
        dataset = BaselineClips(data, spec)
        # reshuffled epochs back to back, so batches may span epochs (as our loader's do)
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=2 ** 31)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                             num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda")
        iterable = ({k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in loader)
    else:
        backend = "dali" if path_name == "dali" else "cpu"
        on = device if backend == "dali" else torch.device("cpu")
        cfg = DataConfig(path=data, batch_size=args.batch_size, backend=backend, device=str(on),
                         num_threads=args.threads, num_workers=args.workers, dtype=args.dtype)
        iterable = build_loader(cfg, spec, 0, 1)
    return measure(iterable, args.steps, args.warmup, args.batch_size, spec.frames, device)


def synth_dataset(size: str, videos: int, fmt: str, out: Path) -> Path:
    """Pack `videos` synthetic 32-frame clips of WxH into `out` (reused when it already exists)."""
    from shard_tools import pack
    from shard_tools.synth import make_dataset

    if (out / "manifest.json").is_file():
        return out
    width, height = (int(v) for v in size.lower().split("x"))
    raw = make_dataset(out.parent / (out.name + "-raw"), videos=videos, classes=3, davis=0, frames=32,
                       width=width, height=height)
    if pack.main(["--kind", "videos", "--src", str(raw / "videos"), "--out", str(out), "--format", fmt,
                  "--fps", "25", "--short-side", str(min(width, height)), "--quiet"]) != 0:
        raise SystemExit(f"packing the synthetic dataset into {out} failed")
    shutil.rmtree(raw)
    return out


def table(rows: list[dict]) -> str:
    cols = ["path", "family", "T", "batch", "clips_per_s", "frames_per_s", "cpu_pct", "cpu_ms_per_clip", "gpu_pct",
            "nvdec_pct", "nvjpg_pct", "speedup", "decoder"]
    cells = [[("-" if r.get(c) is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="packed dataset folder (shard_tools/pack.py output)")
    p.add_argument("--synth", metavar="WxH", help="instead of --data: pack synthetic clips of this size first")
    p.add_argument("--synth-videos", type=int, default=24, help="number of synthetic 32-frame clips (--synth)")
    p.add_argument("--synth-format", default="jpeg", choices=["jpeg", "h264", "vp9"], help="sample format (--synth)")
    p.add_argument("--synth-dir", default=None, help="where to keep the synthetic dataset for reuse (default: a temp dir)")
    p.add_argument("--family", nargs="+", default=["multicrop", "grid", "clip"], choices=list(FAMILIES),
                   help="view families to measure (objective defaults, see above)")
    p.add_argument("--frames", type=int, default=None, help="override T for every family (1: image mode)")
    p.add_argument("--stride", type=int, default=None, help="override the frame stride for every family")
    p.add_argument("--paths", nargs="+", default=["dali", "cpu", "baseline"], choices=["dali", "cpu", "baseline"],
                   help="loaders to measure")
    p.add_argument("--batch-size", type=int, default=32, help="clips per batch")
    p.add_argument("--steps", type=int, default=20, help="measured batches per row")
    p.add_argument("--warmup", type=int, default=3, help="batches before measuring (worker start-up)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="reader processes: DataLoader workers (cpu, baseline) or DALI python workers (dali)")
    p.add_argument("--threads", type=int, default=4, help="DALI decoder threads")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="view dtype on the GPU (CPU paths always produce float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where batches must land (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = p.parse_args(argv)
    if bool(args.data) == bool(args.synth):
        p.error("give exactly one of --data and --synth")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(synth_dataset(args.synth, args.synth_videos, args.synth_format,
                                              Path(args.synth_dir or tmp) / f"synth-{args.synth}-{args.synth_format}"))
        fmt = ShardDataset(data).format
        rows = []
        for family in args.family:
            spec = FAMILIES[family]
            overrides = {k: v for k, v in (("frames", args.frames), ("stride", args.stride)) if v is not None}
            spec = dataclasses.replace(spec, **overrides)
            baseline = None
            for path_name in sorted(args.paths, key=lambda n: n != "baseline"):      # baseline first
                result = run_path(path_name, data, spec, args, device)
                row = {"path": path_name, "family": family, "T": spec.frames, "batch": args.batch_size,
                       "format": fmt, "device": str(device), **result,
                       "decoder": ({"jpeg": "pil", "vp9": "pyav", "h264": "pyav"}[fmt] if path_name == "cpu" else
                                   "dali" if path_name == "dali" else
                                   "pil" if fmt == "jpeg" else baseline_decoder())}
                if path_name == "baseline":
                    baseline = row["clips_per_s"]
                row["speedup"] = round(row["clips_per_s"] / baseline, 2) if baseline else None
                rows.append(row)
                print(f"measured {path_name} {family} T={spec.frames}: {row['clips_per_s']} clips/s", file=sys.stderr)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
