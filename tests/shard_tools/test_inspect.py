import shutil
import struct

from PIL import Image

from shard_tools import inspect as inspect_tool
from shard_tools.index import read_index


def test_list_dump_and_verify_a_sound_dataset(eval_shards, tmp_path, capsys):
    assert inspect_tool.main([str(eval_shards), "--list", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "2 samples, 64 frames" in out and "32 masks" in out and "verify: all shards" in out
    assert inspect_tool.main([str(eval_shards), "--sample", "eval_synth01_00000", "--dump", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*_f*.png"))) == 32 and len(list(tmp_path.glob("*_m*.png"))) == 32
    assert Image.open(tmp_path / "eval_synth01_00000_f000.png").size == (128, 96)


def test_verify_finds_a_wrong_frame_count_and_a_changed_shard(jpeg_shards, tmp_path, capsys):
    damaged = tmp_path / "jpeg"
    shutil.copytree(jpeg_shards, damaged)
    tar = sorted(damaged.glob("*.tar"))[0]
    key, members = read_index(tar.with_suffix(".idx"))[0]
    offset, size = members["nframes.i32"]
    data = bytearray(tar.read_bytes())
    data[offset:offset + size] = struct.pack("<i", 31)
    tar.write_bytes(bytes(data))
    assert inspect_tool.main([str(damaged), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"{tar.name}: sha256 differs" in out and f"{key}: nframes.i32 31, json 32, decoded 32" in out
