"""Pack a video collection into WebDataset shards with DALI indexes and a manifest.

    python shard_tools/pack.py --kind videos --src kinetics/train --out shards/k400 --workers 8
    python shard_tools/pack.py --kind frames --src DAVIS --out shards/davis          # masks -> eval samples
    python shard_tools/pack.py --kind long --src walking_tours --out shards/wt --clip-seconds 10 --fps 10

How it works: (1) every source (video file or frame folder) is decoded once, sequentially, by one
worker, resampled to a constant --fps and --short-side, encoded, and its samples are spooled to
`<out>/.spool/<video-id>.tar` (renamed when complete); (2) all samples are shuffled with --seed and
copied into `<name>-NNNNNN.tar` shards of about --shard-size, each written under a temporary name and
renamed with its `.idx` once complete; (3) `manifest.json` records shards, counts, settings, versions
and every skipped input with its reason. Rerunning the same command resumes: spooled sources are not
decoded again and no sample is written twice. The same inputs and options give byte-identical
shards, whatever --workers is. The spool needs as much free disk as the shards, until the end.

Exit status: 0 when at least one sample was packed, 1 when nothing could be packed, 2 on bad
arguments or (with --strict) on the first bad input.
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import av  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
from tqdm import tqdm  # noqa: E402

import shard_tools  # noqa: E402
from shard_tools.cli import ArgumentParser  # noqa: E402
from shard_tools.encode import FORMATS, BadInput, EncodeSettings  # noqa: E402
from shard_tools.keys import sample_key, sanitize_key  # noqa: E402
from shard_tools.manifest import MANIFEST, write_manifest  # noqa: E402
from shard_tools.sources import (Segment, Source, eval_sample, find_frame_folders, find_videos,  # noqa: E402
                                 frame_folder_segments, video_segments)
from shard_tools.writer import PARTIAL_SUFFIX, SampleTar, ShardWriter  # noqa: E402

SPOOL = ".spool"
KINDS = ("videos", "frames", "long")


class UsageError(Exception):
    """Bad arguments or an output folder pack.py must not touch: reported, exit status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and the default of every option that has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        shown = f"{action.default:g}" if isinstance(action.default, float) else action.default
        return f"{action.help} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="shard_tools/pack.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--kind", choices=KINDS, required=True,
                   help="videos: a tree of video files, labels from class folders or --labels; "
                        "frames: folders of JPEG frames (JPEGImages/<video>/, optional Annotations/<video>/ "
                        "masks -> evaluation samples with the original bytes); long: long videos cut into "
                        "--clip-seconds segments")
    p.add_argument("--src", required=True, help="input folder")
    p.add_argument("--out", required=True, help="output dataset folder (created)")
    p.add_argument("--name", default=None, help="dataset name: shard prefix and key prefix (default: --out's folder name)")
    p.add_argument("--labels", default=None, help="CSV of `path,label` rows (path relative to --src); "
                                                  "videos it does not list are skipped and reported")
    p.add_argument("--subset", default=None, help="--kind frames: a text file naming the frame folders to pack, one "
                                                  "per line (e.g. DAVIS ImageSets/2017/val.txt); others are left out")
    p.add_argument("--format", choices=FORMATS, default="jpeg",
                   help="sample payload: JPEG frames (fastest to train from), H.264 mp4 or VP9 webm (compact)")
    p.add_argument("--fps", type=float, default=30.0, help="constant output frame rate (frames: the declared rate of the folders)")
    p.add_argument("--short-side", type=int, default=256, help="resize so the short side is this many pixels (0: keep); sizes are even")
    p.add_argument("--clip-seconds", type=float, default=None,
                   help="cut each source into samples of this many seconds (required for --kind long); "
                        "a shorter tail is dropped and counted in the manifest")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (--format jpeg)")
    p.add_argument("--crf", type=int, default=23, help="constant-quality factor (--format h264|vp9)")
    p.add_argument("--gop", type=int, default=16, help="closed GOP length in frames (--format h264|vp9)")
    p.add_argument("--preset", default="fast", help="x264 preset (--format h264)")
    p.add_argument("--shard-size", type=float, default=1e9, help="target shard size in bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle of samples across shards")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (each decodes whole sources)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing dataset in --out and start again")
    p.add_argument("--strict", action="store_true", help="stop with exit status 2 at the first bad input")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def pack_settings(args: argparse.Namespace) -> dict:
    """Every option that changes the output (the manifest's `settings`; a resume must match them)."""
    return {"kind": args.kind, "src": str(Path(args.src).resolve()), "name": args.name, "labels": args.labels,
            "subset": args.subset, "format": args.format, "fps": args.fps, "short_side": args.short_side,
            "clip_seconds": args.clip_seconds, "quality": args.quality, "crf": args.crf, "gop": args.gop,
            "preset": args.preset, "shard_size": args.shard_size, "seed": args.seed}


def _versions() -> dict:
    return {"shard_tools": shard_tools.__version__, "python": platform.python_version(), "av": av.__version__,
            "ffmpeg": str(getattr(av, "ffmpeg_version_info", "")),
            "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])), "numpy": np.__version__, "pillow": PIL.__version__}


def _sample_json(settings: dict, source: Source, key: str, segment: Segment, label: int | None,
                 extra: dict) -> bytes:
    """The sample's `json` member (fields listed in docs/design.md §1)."""
    meta = {"key": key, "dataset": settings["name"], "source": source.rel, "video_id": source.video_id,
            "segment": segment.index, "start_time": round(segment.start_frame / settings["fps"], 6),
            "fps": settings["fps"], "width": segment.width, "height": segment.height, "nframes": segment.nframes,
            "format": "original" if extra["eval"] else settings["format"], "label": label,
            "label_name": source.label, "frames": None, "masks": None, **extra}
    return json.dumps(meta, sort_keys=True).encode("utf-8")


def pack_source(job: tuple[dict, Source, int | None, str, int]) -> dict:
    """Worker: turn one source into samples in its spool tar; returns (and writes) its record.

    A bad source leaves no samples, except with --kind long, where the complete segments before the
    error are kept and the error is still reported.
    """
    settings, source, label, spool_dir, decode_threads = job
    spool_dir = Path(spool_dir)
    enc = EncodeSettings(format=settings["format"], fps=settings["fps"], short_side=settings["short_side"],
                         quality=settings["quality"], crf=settings["crf"], gop=settings["gop"],
                         preset=settings["preset"])
    clip_frames = round(settings["clip_seconds"] * settings["fps"]) if settings["clip_seconds"] else None
    path = Path(settings["src"]) / source.rel
    tar_path = spool_dir / f"{source.video_id}.tar"
    tar = SampleTar(tar_path.with_name(tar_path.name + PARTIAL_SUFFIX))
    stats: dict = {}
    samples, error = [], None
    try:
        if settings["kind"] == "frames" and source.masks_rel is not None:
            segment, extra = eval_sample(path, Path(settings["src"]) / source.masks_rel)
            segments = [(segment, {"eval": True, "encoder": {"codec": "original"}, **extra})]
        else:
            gen = (frame_folder_segments(path, enc, clip_frames, stats) if settings["kind"] == "frames"
                   else video_segments(str(path), enc, clip_frames, stats, decode_threads))
            segments = ((s, {"eval": False, "encoder": enc.encoder_info(), "source_info": stats.get("source_info")})
                        for s in gen)
        for segment, extra in segments:
            key = sample_key(settings["name"], source.video_id, segment.index)
            members = dict(segment.members)
            members["json"] = _sample_json(settings, source, key, segment, label, extra)
            members["nframes.i32"] = struct.pack("<i", segment.nframes)
            if label is not None:
                members["cls"] = str(label).encode("ascii")
                members["label.i32"] = struct.pack("<i", label)
            written = tar.add(key, members)
            samples.append({"key": key, "nframes": segment.nframes,
                            "members": {ext: [off, size] for ext, off, size in written}})
    except BadInput as err:
        error = str(err)
        if settings["kind"] != "long":
            samples = []
        elif samples:
            error += f"; kept the {len(samples)} complete segments before it"
    except Exception as err:  # noqa: BLE001  one bad file must never crash the run: report it instead
        error, samples = f"unexpected {type(err).__name__}: {err}", []
    tar.close()
    info = stats.get("source_info") or {}
    record = {"source": source.rel, "video_id": source.video_id, "samples": samples,
              "frames": sum(s["nframes"] for s in samples), "error": error,
              "source_size": [info["width"], info["height"]] if "width" in info else None,
              "tail_frames_dropped": stats.get("tail_frames_dropped", 0) if samples else 0}
    if samples:
        os.replace(tar.path, tar_path)
    else:
        tar.path.unlink()
    _write_json_atomic(spool_dir / f"{source.video_id}.json", record)
    return record


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    tmp.write_text(json.dumps(obj, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _prepare_out(out: Path, settings: dict, overwrite: bool) -> dict | None:
    """Check --out against an earlier run. Returns the earlier manifest when it is complete."""
    manifest_path = out / MANIFEST
    if overwrite and out.exists():
        if not manifest_path.exists() and not (out / SPOOL).exists() and any(out.iterdir()):
            raise UsageError(f"--overwrite refuses to delete {out}: it holds files but no {MANIFEST} "
                             "(not a pack.py dataset); choose an empty or new --out")
        shutil.rmtree(out)
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        if previous.get("settings") != settings:
            changed = sorted(k for k in settings if previous.get("settings", {}).get(k) != settings[k])
            raise UsageError(f"{out} was packed with different settings ({', '.join(changed)}); "
                             "rerun with the same options to resume, or add --overwrite to start again")
        if previous.get("complete"):
            return previous
    elif out.exists() and any(p for p in out.iterdir() if p.name != SPOOL):
        raise UsageError(f"{out} is not empty and has no {MANIFEST}; choose a new --out")
    (out / SPOOL).mkdir(parents=True, exist_ok=True)
    return None


def _class_ids(sources: list[Source]) -> dict[str, int] | None:
    """Label name -> id, in sorted name order; numeric names sort as numbers ("2" before "10"), so
    labels that already are ids 0..K-1 keep their values."""
    names = {s.label for s in sources if s.label is not None}
    names = sorted(names, key=int) if all(n.isdigit() for n in names) else sorted(names)
    return {name: i for i, name in enumerate(names)} if names else None


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise UsageError(f"--src {src} is not a folder")
    if args.subset and args.kind != "frames":
        raise UsageError("--subset applies to --kind frames only")
    if args.kind == "long" and not args.clip_seconds:
        raise UsageError("--kind long needs --clip-seconds (the segment length), e.g. --clip-seconds 10")
    if args.clip_seconds and args.format == "jpeg" and round(args.clip_seconds * args.fps) > 1000:
        raise UsageError("a JPEG sample holds at most 1000 frames; lower --clip-seconds or --fps")
    args.name = sanitize_key(args.name or out.resolve().name, 24)
    settings = pack_settings(args)
    if _prepare_out(out, settings, args.overwrite) is not None:
        print(f"{out}: already complete ({MANIFEST}); add --overwrite to pack again")
        return 0
    spool = out / SPOOL
    try:
        if args.kind == "frames":
            subset = Path(args.subset).read_text(encoding="utf-8").split() if args.subset else None
            sources, skipped = find_frame_folders(src, subset)
        else:
            sources, skipped = find_videos(src, args.labels)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    classes = _class_ids(sources)
    manifest = {"name": args.name, "tool_version": shard_tools.__version__, "kind": args.kind,
                "format": "original" if args.kind == "frames" and any(s.masks_rel for s in sources) else args.format,
                "settings": settings, "versions": _versions(), "classes": classes, "shards": [],
                "samples": 0, "frames": 0, "skipped": [], "complete": False}
    write_manifest(out, manifest)
    if args.strict and skipped:
        print(f"error: {skipped[0]['path']}: {skipped[0]['reason']}", file=sys.stderr)
        return 2

    records = _encode_sources(args, settings, sources, classes, spool)
    if records is None:
        return 2
    for record in records:
        if record["error"]:
            skipped.append({"path": record["source"], "reason": record["error"]})
    samples = sorted((s, record["video_id"]) for record in records for s in _iter_samples(record))
    random.Random(args.seed).shuffle(samples)

    for leftover in out.glob(f"{args.name}-*"):        # shards of an interrupted earlier assembly
        leftover.unlink()
    writer = ShardWriter(out, args.name, int(args.shard_size))
    for sample, video_id in samples:
        # One open per sample (not one handle per source) keeps file descriptors bounded for
        # datasets of hundreds of thousands of sources; the open is cheap next to the copy.
        with open(spool / f"{video_id}.tar", "rb") as f:
            members = {}
            for ext, (offset, size) in sample[1]:
                f.seek(offset)
                members[ext] = f.read(size)
        writer.write(sample[0], members, sample[2])
    shards = writer.close()
    manifest.update(shards=[r.as_dict() for r in shards], samples=len(samples),
                    frames=sum(r.frames for r in shards), skipped=sorted(skipped, key=lambda s: s["path"]),
                    tail_frames_dropped=sum(r["tail_frames_dropped"] for r in records), complete=True)
    write_manifest(out, manifest)
    shutil.rmtree(spool)
    print(f"{out}: {len(samples)} samples, {manifest['frames']} frames in {len(shards)} shards; "
          f"{len(skipped)} inputs skipped" + (f" (see {out / MANIFEST})" if skipped else ""))
    for item in skipped:
        print(f"  skipped {item['path']}: {item['reason']}", file=sys.stderr)
    warn_upscaled(records, args.short_side)
    return 0 if samples else 1


def warn_upscaled(records: list[dict], short_side: int) -> None:
    """Say when --short-side enlarged sources: upscaled frames cost disk and decode time, add no detail."""
    small = [r for r in records if r["samples"] and r.get("source_size") and min(r["source_size"]) < short_side]
    if short_side and small:
        w, h = small[0]["source_size"]
        print(f"warning: {len(small)} of {len(records)} source(s) are smaller than --short-side {short_side} and "
              f"were upscaled (e.g. {small[0]['source']}, {w}x{h}); pass --short-side {min(w, h)} (or 0) to keep "
              "their size", file=sys.stderr)


def _iter_samples(record: dict):
    for s in record["samples"]:
        yield (s["key"], tuple(sorted((ext, tuple(v)) for ext, v in s["members"].items())), s["nframes"])


def _encode_sources(args: argparse.Namespace, settings: dict, sources: list[Source],
                    classes: dict[str, int] | None, spool: Path) -> list[dict] | None:
    """Run pack_source over every source not spooled yet; returns all records (None: --strict stop)."""
    records: dict[str, dict] = {}
    for source in sources:
        done = spool / f"{source.video_id}.json"
        if done.exists():
            records[source.video_id] = json.loads(done.read_text(encoding="utf-8"))
    for leftover in spool.glob(f"*{PARTIAL_SUFFIX}"):
        leftover.unlink()
    # Split the cores between workers so their threaded decoders do not oversubscribe the machine.
    decode_threads = max(1, (os.cpu_count() or 1) // args.workers)
    jobs = [(settings, s, classes[s.label] if classes and s.label is not None else None, str(spool), decode_threads)
            for s in sources if s.video_id not in records]
    bar = tqdm(total=len(sources), initial=len(sources) - len(jobs), unit="src", disable=args.quiet,
               desc=f"pack {args.kind}", dynamic_ncols=True)
    start, frames = time.perf_counter(), 0
    pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap_unordered(pack_source, jobs) if pool else map(pack_source, jobs)
        for record in results:
            records[record["video_id"]] = record
            frames += record["frames"]
            bar.update(1)
            bar.set_postfix(frames=frames, fps=f"{frames / max(time.perf_counter() - start, 1e-9):.0f}")
            if record["error"] and args.strict:
                bar.close()
                print(f"error: {record['source']}: {record['error']}", file=sys.stderr)
                return None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
    return [records[s.video_id] for s in sources]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.workers < 1 or args.shard_size <= 0 or args.fps <= 0:
            raise UsageError("--workers, --shard-size and --fps must be positive")
        return run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
