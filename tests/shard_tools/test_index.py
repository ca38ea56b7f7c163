import shutil

import pytest

from shard_tools.index import format_index, index_tar, read_index, write_index
from shard_tools.writer import SampleTar, ShardWriter


def _samples():
    return [("ds_v1_00000", {"json": b"{}", "f000.jpg": b"j" * 700, "f001.jpg": b"k" * 512, "nframes.i32": b"\x02\0\0\0"}),
            ("ds_v2_00000", {"mp4": bytes(range(256)) * 9, "json": b'{"a": 1}', "cls": b"3"})]


@pytest.fixture
def tar_path(tmp_path):
    tar = SampleTar(tmp_path / "s.tar")
    for key, members in _samples():
        tar.add(key, members)
    tar.close()
    (tmp_path / "ours.idx").write_text(format_index(tar.samples))
    return tmp_path / "s.tar"


@pytest.mark.parametrize("use_gnu_tar", [True, False])
def test_index_equals_dali_wds2idx(tar_path, monkeypatch, use_gnu_tar):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx ships with pip install 'densevid[gpu]'")
    if use_gnu_tar and shutil.which("tar") is None:
        pytest.skip("GNU tar not installed")
    if not use_gnu_tar:                      # DALI's tarfile fallback computes offsets another way
        monkeypatch.setattr(wds2idx, "which", lambda name: None)
    creator = wds2idx.IndexCreator(str(tar_path), str(tar_path.with_name("dali.idx")), verbose=False)
    creator.create_index()
    creator.close()
    assert tar_path.with_name("dali.idx").read_text() == tar_path.with_name("ours.idx").read_text()


def test_offsets_point_at_member_data(tar_path):
    data = tar_path.read_bytes()
    entries = dict(read_index(tar_path.with_name("ours.idx")))
    for key, members in _samples():
        assert set(entries[key]) == set(members)
        for ext, payload in members.items():
            offset, size = entries[key][ext]
            assert data[offset:offset + size] == payload


def test_index_tar_rebuilds_the_written_index(tar_path):
    assert format_index(index_tar(tar_path)) == tar_path.with_name("ours.idx").read_text()


def test_read_index_rejects_bad_files(tmp_path):
    (tmp_path / "a.idx").write_text("v1.1 1\njson 512 2\n")
    with pytest.raises(ValueError, match="a.idx.*v1.2"):
        read_index(tmp_path / "a.idx")
    write_index(tmp_path / "b.idx", [("k", [("json", 512, 2)])])
    (tmp_path / "b.idx").write_text((tmp_path / "b.idx").read_text().replace("v1.2 1", "v1.2 3"))
    with pytest.raises(ValueError, match="declares 3 samples but lists 1"):
        read_index(tmp_path / "b.idx")


def test_shard_writer_cuts_shards_by_size_and_renames_when_complete(tmp_path):
    finished = []
    writer = ShardWriter(tmp_path, "ds", max_bytes=9000, on_shard=finished.append)
    for i in range(5):
        writer.write(f"ds_v{i}_00000", {"f000.jpg": bytes([i]) * 2000, "json": b"{}"}, nframes=1)
        # the shard being filled exists only under its temporary name
        current = f"ds-{len(finished):06d}.tar"
        assert (tmp_path / (current + ".partial")).exists() and not (tmp_path / current).exists()
    records = writer.close()
    assert [r.samples for r in records] == [2, 2, 1] and finished == records
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"ds-{i:06d}.tar" for i in range(3)] + [f"ds-{i:06d}.idx" for i in range(3)])
    keys = [k for r in records for k, _ in read_index(tmp_path / r.idx)]
    assert keys == [f"ds_v{i}_00000" for i in range(5)]


def test_packed_shard_indexes_equal_dali_wds2idx(jpeg_shards, tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx ships with pip install 'densevid[gpu]'")
    from shard_tools.manifest import load_manifest

    manifest = load_manifest(jpeg_shards)
    for tar, idx in zip(manifest["tar_paths"], manifest["idx_paths"]):
        creator = wds2idx.IndexCreator(str(tar), str(tmp_path / idx.name), verbose=False)
        creator.create_index()
        creator.close()
        assert (tmp_path / idx.name).read_text() == idx.read_text()
