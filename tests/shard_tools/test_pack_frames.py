import shutil

import numpy as np
from PIL import Image

from shard_tools import pack
from shard_tools.manifest import load_manifest
from shard_tools.reader import decode_frames, frame_members, iter_samples, sample_meta


def run_pack(*args) -> int:
    return pack.main([*map(str, args), "--quiet"])


def test_eval_samples_keep_original_bytes_and_rebuild_davis(eval_shards, davis_dir, tmp_path):
    manifest = load_manifest(eval_shards)
    assert manifest["samples"] == 2 and manifest["format"] == "original" and manifest["skipped"] == []
    for _, key, members in iter_samples(eval_shards):
        meta, nframes = sample_meta(members)
        assert meta["eval"] and nframes == 32 and (meta["width"], meta["height"]) == (128, 96)
        assert len(frame_members(members, "f")) == len(frame_members(members, "m")) == 32
        # rebuild the DAVIS layout from the sample alone and compare byte for byte
        seq = meta["video_id"]
        for i, name in enumerate(meta["frames"]):
            rebuilt = tmp_path / "JPEGImages" / "480p" / seq / name
            rebuilt.parent.mkdir(parents=True, exist_ok=True)
            rebuilt.write_bytes(members[f"f{i:03d}.jpg"])
        for name in meta["masks"]:
            index = meta["frames"].index(name.rsplit(".", 1)[0] + ".jpg")
            rebuilt = tmp_path / "Annotations" / "480p" / seq / name
            rebuilt.parent.mkdir(parents=True, exist_ok=True)
            rebuilt.write_bytes(members[f"m{index:03d}.png"])
    for sub in ("JPEGImages", "Annotations"):
        originals = sorted(p.relative_to(davis_dir) for p in (davis_dir / sub).rglob("*") if p.is_file())
        assert originals == sorted(p.relative_to(tmp_path) for p in (tmp_path / sub).rglob("*") if p.is_file())
        assert all((davis_dir / p).read_bytes() == (tmp_path / p).read_bytes() for p in originals)


def test_frame_folders_without_masks_become_training_samples(davis_dir, tmp_path, psnr):
    src = tmp_path / "frames"
    shutil.copytree(davis_dir / "JPEGImages" / "480p", src)
    out = tmp_path / "out"
    assert run_pack("--kind", "frames", "--src", src, "--out", out, "--short-side", 48, "--fps", 24) == 0
    samples = list(iter_samples(out))
    assert len(samples) == 2
    for _, _, members in samples:
        meta, nframes = sample_meta(members)
        assert not meta["eval"] and nframes == 32 and meta["fps"] == 24
        frames = decode_frames(members)
        assert frames.shape == (32, 48, 64, 3)
        def original(t):
            return np.asarray(Image.open(src / meta["video_id"] / f"{t:05d}.jpg").resize((64, 48), Image.BILINEAR))
        assert psnr(frames[7], original(7)) > 30 > psnr(frames[7], original(20))


def _corrupt_davis(davis_dir, tmp_path):
    """Five copies of a sequence, four broken in a different way; returns the root."""
    root = tmp_path / "davis"
    for name in ("good", "gap", "badjpeg", "orphanmask", "rgbmask"):
        shutil.copytree(davis_dir / "JPEGImages" / "480p" / "synth00", root / "JPEGImages" / "480p" / name)
        shutil.copytree(davis_dir / "Annotations" / "480p" / "synth00", root / "Annotations" / "480p" / name)
    (root / "JPEGImages" / "480p" / "gap" / "00005.jpg").unlink()
    (root / "Annotations" / "480p" / "gap" / "00005.png").unlink()
    jpeg = root / "JPEGImages" / "480p" / "badjpeg" / "00003.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (root / "JPEGImages" / "480p" / "orphanmask" / "00031.jpg").unlink()
    mask = root / "Annotations" / "480p" / "rgbmask" / "00000.png"
    Image.open(mask).convert("RGB").save(mask)
    (root / "JPEGImages" / "480p" / "empty").mkdir()
    (root / "Annotations" / "480p" / "empty").mkdir()
    return root


def test_bad_frame_folders_are_reported_and_the_rest_packed(davis_dir, tmp_path):
    src = _corrupt_davis(davis_dir, tmp_path)
    out = tmp_path / "out"
    assert run_pack("--kind", "frames", "--src", src, "--out", out) == 0
    manifest = load_manifest(out)
    assert [sample_meta(m)[0]["video_id"] for _, _, m in iter_samples(out)] == ["good"]
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in manifest["skipped"]}
    assert "missing frames: numbering jumps from 4 to 6" in reasons["gap"]
    assert "unreadable image 00003.jpg" in reasons["badjpeg"]
    assert "mask 00031.png has no frame" in reasons["orphanmask"]
    assert "mask 00000.png is mode RGB" in reasons["rgbmask"]
    assert "no JPEG frames" in reasons["empty"]
    assert len(reasons) == 5


def test_strict_stops_at_the_first_bad_folder(davis_dir, tmp_path):
    src = _corrupt_davis(davis_dir, tmp_path)
    assert run_pack("--kind", "frames", "--src", src, "--out", tmp_path / "out", "--strict") == 2


def test_subset_packs_only_the_listed_sequences(davis_dir, tmp_path):
    (tmp_path / "val.txt").write_text("synth01\nmissing\n")
    out = tmp_path / "out"
    assert run_pack("--kind", "frames", "--src", davis_dir, "--out", out, "--subset", tmp_path / "val.txt") == 0
    assert [sample_meta(m)[0]["video_id"] for _, _, m in iter_samples(out)] == ["synth01"]
    assert load_manifest(out)["skipped"] == [{"path": "JPEGImages/480p/missing",
                                              "reason": "listed in --subset but no such folder"}]


def test_training_frame_folder_with_mixed_sizes_is_reported(davis_dir, tmp_path):
    src = tmp_path / "frames"
    shutil.copytree(davis_dir / "JPEGImages" / "480p", src)
    Image.open(src / "synth00" / "00004.jpg").resize((64, 48)).save(src / "synth00" / "00004.jpg")
    out = tmp_path / "out"
    assert run_pack("--kind", "frames", "--src", src, "--out", out) == 0
    assert [sample_meta(m)[0]["video_id"] for _, _, m in iter_samples(out)] == ["synth01"]
    [skipped] = load_manifest(out)["skipped"]
    assert skipped == {"path": "synth00", "reason": "frame 00004.jpg is 64x48, the first is 128x96"}
