"""DAVIS-layout reader/writer round trip, palette PNGs, and evaluation shards read like the folder."""
import numpy as np
import pytest
from PIL import Image

from eval.davis_io import DavisFolder, open_sequences, read_mask, voc_palette, write_davis_folder, write_mask


def test_davis_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :32]
    frames = [np.stack([yy * 10, xx * 8, np.full_like(yy, 60 * t)], -1).astype(np.uint8) for t in range(3)]
    masks = [rng.integers(0, 4, (24, 32), dtype=np.uint8) for _ in range(3)]
    masks[1][0, 0] = 255  # void survives
    root = write_davis_folder(tmp_path / "davis", {"seq-a": (frames, masks), "seq-b": (frames[:2], masks[:2])})
    folder = DavisFolder(root)
    assert folder.names == ["seq-a", "seq-b"] and len(folder) == 2
    sequence = folder.sequence("seq-a")
    assert sequence.frame_stems == ("00000", "00001", "00002")
    for t, stem in enumerate(sequence.frame_stems):
        assert np.array_equal(sequence.mask(stem), masks[t])                    # lossless
        assert np.abs(sequence.frame(t).astype(int) - frames[t]).mean() < 3   # smooth images, JPEG quality 95
    with Image.open(root / "Annotations" / "480p" / "seq-a" / "00000.png") as png:
        assert png.mode == "P" and png.getpalette()[:9] == voc_palette()[:3].ravel().tolist()


def test_read_mask_rejects_colour_png(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="single-channel"):
        read_mask(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="0..255"):
        write_mask(tmp_path / "bad.png", np.full((2, 2), 300))


def test_missing_layout_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        DavisFolder(tmp_path)


def test_eval_shards_read_like_the_folder(davis_dir, eval_shards):
    folder = {s.name: s for s in open_sequences(davis_dir)}
    shards = {s.name: s for s in open_sequences(eval_shards)}
    assert sorted(folder) == sorted(shards)
    for name, from_folder in folder.items():
        from_shards = shards[name]
        assert from_shards.frame_stems == from_folder.frame_stems
        assert sorted(from_shards.masks) == sorted(from_folder.masks)
        for stem in from_folder.masks:
            assert from_shards.masks[stem] == from_folder.masks[stem].read_bytes()  # original bytes
        assert from_shards.frames[5] == from_folder.frames[5].read_bytes()
