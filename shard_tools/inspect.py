"""Look inside a packed dataset: summary, samples, one decoded sample, full verification.

    python shard_tools/inspect.py DATASET                       # manifest summary and shards
    python shard_tools/inspect.py DATASET --list                # one line per sample
    python shard_tools/inspect.py DATASET --sample KEY --dump DIR   # decode one sample to PNGs
    python shard_tools/inspect.py DATASET --verify              # check every shard and sample

--verify checks that each shard's checksum and size match the manifest, that its `.idx` equals an
index rebuilt from the tar, that keys are unique and dot-free, and that every sample decodes to
exactly `nframes` frames of the size its `json` states. Exit status 1 if anything is wrong.
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import io  # noqa: E402
from pathlib import Path  # noqa: E402

import av  # noqa: E402
from PIL import Image  # noqa: E402

from shard_tools.index import index_tar, read_index  # noqa: E402
from shard_tools.manifest import load_manifest  # noqa: E402
from shard_tools.reader import decode_frames, frame_members, iter_samples, sample_meta  # noqa: E402
from shard_tools.writer import sha256_file  # noqa: E402


def summary(dataset: Path) -> str:
    m = load_manifest(dataset)
    lines = [f"{dataset}: {m['name']} ({m['kind']}, {m['format']}), {m['samples']} samples, {m['frames']} frames, "
             f"{len(m['shards'])} shards, {sum(s['bytes'] for s in m['shards']) / 1e6:.1f} MB",
             f"  fps {m['settings']['fps']}, short side {m['settings']['short_side']}, "
             f"clip seconds {m['settings']['clip_seconds']}, classes {len(m['classes'] or {})}"]
    lines += [f"  {s['tar']}: {s['samples']} samples, {s['frames']} frames, {s['bytes'] / 1e6:.1f} MB"
              for s in m["shards"]]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in m["skipped"]]
    return "\n".join(lines)


def list_samples(dataset: Path) -> str:
    lines = []
    for tar, key, members in iter_samples(dataset):
        meta, nframes = sample_meta(members)
        payload = "mp4" if "mp4" in members else "webm" if "webm" in members else f"{len(frame_members(members))} jpg"
        lines.append(f"{tar.name} {key}: {nframes} frames {meta['width']}x{meta['height']} ({payload}"
                     f"{', %d masks' % len(frame_members(members, 'm')) if meta['eval'] else ''}), "
                     f"label {meta['label_name']}, source {meta['source']} @ {meta['start_time']} s")
    return "\n".join(lines)


def dump_sample(dataset: Path, key: str, out: Path) -> int:
    """Write one sample's frames (and masks) as PNGs; returns the number of frames."""
    for _, k, members in iter_samples(dataset):
        if k == key:
            out.mkdir(parents=True, exist_ok=True)
            frames = decode_frames(members)
            for i, frame in enumerate(frames):
                Image.fromarray(frame).save(out / f"{key}_f{i:03d}.png")
            for name in frame_members(members, "m"):
                (out / f"{key}_{name}").write_bytes(members[name])
            return len(frames)
    raise SystemExit(f"error: no sample {key!r} in {dataset}; list them with --list")


def verify_dataset(dataset: Path) -> list[str]:
    """Every problem found in the dataset, as readable lines (empty when it is sound)."""
    m = load_manifest(dataset)
    problems, keys, total = [], set(), 0
    for shard, tar, idx in zip(m["shards"], m["tar_paths"], m["idx_paths"]):
        if sha256_file(tar) != shard["sha256"]:
            problems.append(f"{tar}: sha256 differs from the manifest")
        rebuilt = [(k, {ext: (off, size) for ext, off, size in members}) for k, members in index_tar(tar)]
        if rebuilt != read_index(idx):
            problems.append(f"{idx}: does not match the members of {tar.name}")
    for tar, key, members in iter_samples(dataset):
        total += 1
        if key in keys or "." in key:
            problems.append(f"{tar.name} {key}: duplicate key or key with a dot")
        keys.add(key)
        meta, nframes = sample_meta(members)
        try:
            frames = decode_frames(members)
        except (OSError, ValueError, av.FFmpegError) as err:
            problems.append(f"{tar.name} {key}: does not decode: {err}")
            continue
        if len(frames) != nframes or meta["nframes"] != nframes:
            problems.append(f"{tar.name} {key}: nframes.i32 {nframes}, json {meta['nframes']}, decoded {len(frames)}")
        if frames.shape[1:3] != (meta["height"], meta["width"]):
            problems.append(f"{tar.name} {key}: frames {frames.shape[2]}x{frames.shape[1]}, "
                            f"json {meta['width']}x{meta['height']}")
        for name in frame_members(members, "m"):
            with Image.open(io.BytesIO(members[name])) as mask:
                if mask.size != (meta["width"], meta["height"]):
                    problems.append(f"{tar.name} {key}.{name}: mask size {mask.size}")
    if total != m["samples"]:
        problems.append(f"manifest lists {m['samples']} samples, the shards hold {total}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="dataset folder written by pack.py (holds manifest.json)")
    parser.add_argument("--list", action="store_true", help="print one line per sample")
    parser.add_argument("--sample", help="key of the sample to decode with --dump")
    parser.add_argument("--dump", type=Path, help="folder to write the --sample's frames (PNG) and masks to")
    parser.add_argument("--verify", action="store_true", help="decode every sample and check it (exit 1 on problems)")
    args = parser.parse_args(argv)
    print(summary(args.dataset))
    if args.list:
        print(list_samples(args.dataset))
    if args.sample or args.dump:
        if not (args.sample and args.dump):
            parser.error("--sample and --dump go together")
        print(f"wrote {dump_sample(args.dataset, args.sample, args.dump)} frames to {args.dump}")
    if args.verify:
        problems = verify_dataset(args.dataset)
        print("\n".join(problems) if problems else "verify: all shards and samples are consistent")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
