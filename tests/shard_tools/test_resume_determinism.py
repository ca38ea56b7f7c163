"""Same inputs + seed -> byte-identical datasets; an interrupted run resumes without duplicates."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shard_tools import pack, writer
from shard_tools.inspect import verify_dataset

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = ["--kind", "videos", "--name", "ds", "--fps", "25", "--short-side", "64", "--shard-size", "150000", "--quiet"]


def run_pack(src, out, *extra) -> int:
    return pack.main([*OPTIONS, "--src", str(src), "--out", str(out), *map(str, extra)])


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a dataset folder by name (the spool must be gone)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def reference(synth_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ds"
    assert run_pack(synth_raw / "videos", out) == 0
    files = snapshot(out)
    assert sum(name.endswith(".tar") for name in files) >= 2 and "manifest.json" in files
    return files


def test_same_inputs_and_seed_give_identical_bytes_whatever_the_workers(synth_raw, tmp_path, reference):
    assert run_pack(synth_raw / "videos", tmp_path / "w2", "--workers", 2) == 0
    assert snapshot(tmp_path / "w2") == reference


def test_run_interrupted_while_encoding_resumes_without_reencoding(synth_raw, tmp_path, reference, monkeypatch):
    real, calls = pack.pack_source, []

    def dies_after_three(job):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(job[1].rel)
        return real(job)

    monkeypatch.setattr(pack, "pack_source", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_pack(synth_raw / "videos", tmp_path / "ds")
    assert not any(p.suffix == ".tar" for p in (tmp_path / "ds").iterdir())
    done = list(calls)
    calls.clear()
    monkeypatch.setattr(pack, "pack_source", lambda job: calls.append(job[1].rel) or real(job))
    assert run_pack(synth_raw / "videos", tmp_path / "ds") == 0
    assert len(calls) == 3 and not set(calls) & set(done)           # only the rest was encoded
    assert snapshot(tmp_path / "ds") == reference


def test_run_interrupted_while_writing_shards_resumes(synth_raw, tmp_path, reference, monkeypatch):
    real, written = writer.ShardWriter.write, []

    def dies_after_four(self, key, members, nframes):
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(key)
        real(self, key, members, nframes)

    monkeypatch.setattr(writer.ShardWriter, "write", dies_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_pack(synth_raw / "videos", tmp_path / "ds")
    names = [p.name for p in (tmp_path / "ds").iterdir()]
    assert "ds-000000.tar" in names and any(n.endswith(".tar.partial") for n in names)
    monkeypatch.undo()
    assert run_pack(synth_raw / "videos", tmp_path / "ds") == 0
    assert snapshot(tmp_path / "ds") == reference and verify_dataset(tmp_path / "ds") == []


def test_killed_process_resumes(synth_raw, tmp_path, reference):
    out = tmp_path / "ds"
    cmd = [sys.executable, str(ROOT / "shard_tools" / "pack.py"), *OPTIONS, "--src", str(synth_raw / "videos"),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    spool = out / ".spool"
    while proc.poll() is None and time.time() < deadline:
        if spool.is_dir() and len(list(spool.glob("*.json"))) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("pack.py finished before it could be killed")
    assert subprocess.run(cmd, cwd=ROOT).returncode == 0
    assert snapshot(out) == reference


def test_complete_dataset_rerun_overwrite_and_changed_settings(synth_raw, tmp_path, reference, capsys):
    out = tmp_path / "ds"
    assert run_pack(synth_raw / "videos", out) == 0
    assert run_pack(synth_raw / "videos", out) == 0
    assert "already complete" in capsys.readouterr().out
    assert run_pack(synth_raw / "videos", out, "--fps", 10) == 2
    assert "different settings (fps)" in capsys.readouterr().err
    (out / "ds-000000.tar").unlink()
    assert run_pack(synth_raw / "videos", out, "--overwrite") == 0
    assert snapshot(out) == reference


def test_refuses_to_write_into_a_folder_that_is_not_a_dataset(synth_raw, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert run_pack(synth_raw / "videos", tmp_path) == 2
    assert "is not empty and has no manifest.json" in capsys.readouterr().err
    assert run_pack(synth_raw / "videos", tmp_path, "--overwrite") == 2
    assert "--overwrite refuses to delete" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
