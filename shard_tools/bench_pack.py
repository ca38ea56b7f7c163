"""Packing throughput: pack.py at 1..N workers next to the ffmpeg CLI doing the same transcode.

    python shard_tools/bench_pack.py --work /tmp/bench_pack --workers 1 2 --formats jpeg h264

Generates synthetic H.264 inputs once (about web-video bit rate) (`--videos` of `--seconds` at `--width`x`--height`, 30 fps),
then for every format and worker count times `pack.py --kind videos` (constant --fps, short side
--short-side, JPEG quality 90 or H.264 CRF 23 / GOP 16 / no B-frames) and, when `ffmpeg` is on PATH
(or given with --ffmpeg), the same transcode by the ffmpeg CLI, one process per video with the same
number running at once and the same decoder threads. ffmpeg writes loose files (JPEG frames or one
mp4 per video), not shards, so it does less work than pack.py (no shuffle, tar, index, manifest).
Prints a Markdown table of output frames per second (total and per worker) and CPU milliseconds per
output frame (all processes; unlike wall time it barely moves when other jobs share the machine);
the fastest of --repeat runs counts.
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

from shard_tools import pack  # noqa: E402
from shard_tools.synth import render_video, write_mp4  # noqa: E402

SOURCE_FPS = 30


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: unlike wall time it
    barely changes when other jobs compete for the cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_inputs(folder: Path, videos: int, seconds: float, width: int, height: int) -> list[Path]:
    """Synthetic H.264 inputs (kept between runs: only made when missing)."""
    paths = []
    for i in range(videos):
        path = folder / f"video_{i:03d}.mp4"
        if not path.exists():
            # Little sensor noise and CRF 23: a bit rate like web video (noise makes decoding slow).
            frames, _ = render_video(1000 + i, int(seconds * SOURCE_FPS), width, height, 3, "blobs", noise=0.005)
            write_mp4(path, frames, SOURCE_FPS, crf=23)
        paths.append(path)
    return paths


def time_pack(src: Path, out: Path, fmt: str, workers: int, fps: float,
              short_side: int) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and output frames of one pack.py run."""
    start, cpu = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):
        code = pack.main(["--kind", "videos", "--src", str(src), "--out", str(out), "--format", fmt, "--fps",
                          str(fps), "--short-side", str(short_side), "--workers", str(workers), "--overwrite",
                          "--quiet"])
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if code != 0:
        raise RuntimeError(f"pack.py failed on {src}")
    return seconds, cpu, json.loads((out / "manifest.json").read_text())["frames"]


def ffmpeg_command(ffmpeg: str, video: Path, out: Path, fmt: str, fps: float, short_side: int,
                   decode_threads: int) -> list[str]:
    """The ffmpeg CLI transcode matching pack.py's settings for one video."""
    scale = f"fps={fps},scale='if(lt(iw,ih),{short_side},-2)':'if(lt(iw,ih),-2,{short_side})':flags=area"
    head = [ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-threads", str(decode_threads), "-i", str(video),
            "-an", "-vf", scale]
    if fmt == "jpeg":
        out.mkdir(parents=True, exist_ok=True)
        return head + ["-q:v", "3", "-threads", "1", str(out / "f%03d.jpg")]
    return head + ["-c:v", "libx264", "-profile:v", "high", "-pix_fmt", "yuv420p", "-crf", "23", "-preset", "fast",
                   "-g", "16", "-keyint_min", "16", "-sc_threshold", "0", "-bf", "0", "-threads", "1",
                   str(out) + ".mp4"]


def time_ffmpeg(ffmpeg: str, videos: list[Path], out: Path, fmt: str, workers: int, fps: float,
                short_side: int) -> tuple[float, float]:
    """Wall and CPU seconds for `workers` concurrent ffmpeg processes to transcode every video."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    threads = max(1, (os.cpu_count() or 1) // workers)
    commands = [ffmpeg_command(ffmpeg, v, out / v.stem, fmt, fps, short_side, threads) for v in videos]
    start, cpu = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(workers) as pool:
        for result in pool.map(lambda cmd: subprocess.run(cmd, capture_output=True), commands):
            if result.returncode != 0:
                raise RuntimeError(f"ffmpeg failed: {result.stderr.decode()[-500:]}")
    return time.perf_counter() - start, cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for inputs and outputs")
    parser.add_argument("--videos", type=int, default=4, help="number of input videos")
    parser.add_argument("--seconds", type=float, default=10, help="length of each input video")
    parser.add_argument("--width", type=int, default=640, help="input width")
    parser.add_argument("--height", type=int, default=360, help="input height")
    parser.add_argument("--fps", type=float, default=30, help="packed frame rate")
    parser.add_argument("--short-side", type=int, default=256, help="packed short side")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--formats", nargs="+", default=["jpeg", "h264"], choices=["jpeg", "h264", "vp9"],
                        help="sample formats to time (ffmpeg is timed for jpeg and h264)")
    parser.add_argument("--ffmpeg", default=shutil.which("ffmpeg"), help="ffmpeg binary (default: from PATH; none: skip)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration; the fastest counts")
    args = parser.parse_args(argv)

    src = args.work / "inputs"
    videos = make_inputs(src, args.videos, args.seconds, args.width, args.height)
    print(f"{len(videos)} inputs {args.width}x{args.height} {SOURCE_FPS} fps, {args.seconds:g} s each; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
          f"ffmpeg: {args.ffmpeg or 'not found'}")
    print("| format | workers | pack.py frames/s | per worker | CPU ms/frame | ffmpeg CLI frames/s | per process "
          "| CPU ms/frame |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for fmt in args.formats:
        for workers in args.workers:
            seconds, cpu, frames = min(time_pack(src, args.work / f"out-{fmt}", fmt, workers, args.fps,
                                                 args.short_side) for _ in range(args.repeat))
            row = {"format": fmt, "workers": workers, "frames": frames, "pack_s": seconds, "pack_cpu_s": cpu}
            line = f"| {fmt} | {workers} | {frames / seconds:.0f} | {frames / seconds / workers:.0f} | {1e3 * cpu / frames:.1f} |"
            if args.ffmpeg and fmt in ("jpeg", "h264"):
                ff, ff_cpu = min(time_ffmpeg(args.ffmpeg, videos, args.work / f"ffmpeg-{fmt}", fmt, workers,
                                             args.fps, args.short_side) for _ in range(args.repeat))
                row.update(ffmpeg_s=ff, ffmpeg_cpu_s=ff_cpu)
                line += f" {frames / ff:.0f} | {frames / ff / workers:.0f} | {1e3 * ff_cpu / frames:.1f} |"
            else:
                line += " n/a | n/a | n/a |"
            results.append(row)
            print(line, flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
