"""shard_tools.datasets: downloads served from 127.0.0.1 inside the test (never the real network), resumed,
restarted, refused; archives and folders checked; the printed pack.py commands accepted by pack.py."""
import contextlib
import dataclasses
import hashlib
import io
import json
import shlex
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from shard_tools import datasets, pack

ARCHIVE_NAME = "DAVIS-2017-trainval-480p.zip"


def davis_zip(masks: str | None = "Annotations", sequences=(("bear", "train"), ("dog", "val")), frames=3) -> bytes:
    """A DAVIS-2017-shaped zip: DAVIS/JPEGImages/480p/<seq>/0000N.jpg, DAVIS/<masks>/480p/<seq>/0000N.png,
    DAVIS/ImageSets/2017/{train,val}.txt (`masks=None`: no annotation folder)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for name, _ in sequences:
            for t in range(frames):
                jpg, png = io.BytesIO(), io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(jpg, "JPEG")
                zipped.writestr(f"DAVIS/JPEGImages/480p/{name}/{t:05d}.jpg", jpg.getvalue())
                if masks:
                    Image.fromarray(np.eye(24, 32, dtype=np.uint8), mode="P").save(png, "PNG")
                    zipped.writestr(f"DAVIS/{masks}/480p/{name}/{t:05d}.png", png.getvalue())
        for subset in ("train", "val"):
            zipped.writestr(f"DAVIS/ImageSets/2017/{subset}.txt",
                            "".join(f"{name}\n" for name, s in sequences if s == subset))
    return buffer.getvalue()


PAYLOAD = davis_zip()


@contextlib.contextmanager
def serve(payload: bytes, name: str = ARCHIVE_NAME):
    """Serve `payload` at http://127.0.0.1:<port>/<name>. The returned state switches the server's
    behaviour between requests: `ranges` (honour Range headers), `cut_at` (close the connection once
    this byte of the file is sent, Content-Length still announcing the whole). `requests` logs each
    request as (Range header, bytes it sends)."""
    state = {"ranges": True, "cut_at": None, "requests": []}

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a stuck client cannot hold the test's server thread

        def do_GET(self):
            asked = self.headers.get("Range")
            start = int(asked.removeprefix("bytes=").split("-")[0]) if asked and state["ranges"] else 0
            body = payload[start:state["cut_at"]] if state["cut_at"] else payload[start:]
            # logged before the headers go out: a client that drops this reply on its headers and asks
            # again must find this request logged before its next one (threads: one per request)
            state["requests"].append((asked, len(body)))
            if start:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        state["url"] = f"http://127.0.0.1:{server.server_port}/{name}"
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def catalogue(url: str, payload: bytes | None = PAYLOAD, **changes) -> dict:
    """The real catalogue with davis2017 pointing at `url`; size and sha256 of `payload` (None: unknown)."""
    known = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()} if payload else \
        {"size": None, "sha256": None}
    return {**datasets.ARCHIVES,
            "davis2017": dataclasses.replace(datasets.ARCHIVES["davis2017"], url=url, **{**known, **changes})}


def run(*args, archives=None):
    return datasets.main([*map(str, args), "--quiet"] if args[0] in datasets.ARCHIVES else list(map(str, args)),
                         **({"archives": archives} if archives else {}))


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def pack_accepts(command_line: str) -> None:
    """The printed command is `python shard_tools/pack.py ...` with flags pack.py really has."""
    words = shlex.split(command_line.strip())
    assert words[:2] == ["python", "shard_tools/pack.py"]
    pack.build_parser().parse_args(words[2:])


def test_download_checks_unpacks_reports_and_a_rerun_downloads_nothing(tmp_path, capsys):
    out = tmp_path / "data"
    with serve(PAYLOAD) as server:
        archives = catalogue(server["url"])
        assert run("davis2017", "--out", out, archives=archives) == 0
        printed = capsys.readouterr().out
        assert f"{out / 'DAVIS'}: 2 sequences (train 1, val 1), 6 frames, 6 masks" in printed
        assert sorted(p.name for p in (out / "DAVIS" / "JPEGImages" / "480p").iterdir()) == ["bear", "dog"]
        assert (out / ARCHIVE_NAME).read_bytes() == PAYLOAD
        record = (out / (ARCHIVE_NAME + ".sha256")).read_text()
        assert record == f"{hashlib.sha256(PAYLOAD).hexdigest()}  {ARCHIVE_NAME}\n"
        assert sorted(p.name for p in out.iterdir()) == ["DAVIS", ARCHIVE_NAME, ARCHIVE_NAME + ".sha256"]
        [pack_command] = [line for line in printed.splitlines() if "shard_tools/pack.py" in line]
        assert f"--src {out / 'DAVIS'} --subset {out / 'DAVIS'}/ImageSets/2017/val.txt" in pack_command
        pack_accepts(pack_command)
        assert f"  python eval/run.py labelprop --ckpt RUN --data {out / 'DAVIS'}" in printed
        assert run("davis2017", "--out", out, archives=archives) == 0
        assert "already prepared: 2 sequences" in capsys.readouterr().out
        assert len(server["requests"]) == 1


def test_an_interrupted_download_is_kept_and_resumed_where_it_stopped(tmp_path, capsys):
    out, cut = tmp_path / "data", len(PAYLOAD) // 3
    with serve(PAYLOAD) as server:
        archives = catalogue(server["url"])
        server["cut_at"] = cut
        assert run("davis2017", "--out", out, archives=archives) == 1
        assert f"stopped at {cut} of {len(PAYLOAD)} bytes; rerun the same command to resume" in one_error_line(capsys)
        assert (out / (ARCHIVE_NAME + ".part")).stat().st_size == cut and not (out / "DAVIS").exists()
        server["cut_at"] = None
        assert run("davis2017", "--out", out, archives=archives) == 0
        assert server["requests"][-1] == (f"bytes={cut}-", len(PAYLOAD) - cut)  # only the rest was sent
    assert (out / ARCHIVE_NAME).read_bytes() == PAYLOAD and (out / "DAVIS" / "ImageSets").is_dir()
    assert not list(out.glob("*.part*"))


def test_a_server_that_ignores_range_gets_a_fresh_download_not_a_mixed_one(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    with serve(PAYLOAD) as server:
        server["ranges"] = False
        # a part of the right URL and size whose bytes are not the file's: appending would mix them
        (out / (ARCHIVE_NAME + ".part")).write_bytes(b"x" * 100)
        (out / (ARCHIVE_NAME + ".part.json")).write_text(json.dumps({"url": server["url"], "size": len(PAYLOAD)}))
        assert run("davis2017", "--out", out, archives=catalogue(server["url"])) == 0
        assert server["requests"] == [("bytes=100-", len(PAYLOAD))]
    assert "does not resume downloads); starting again from byte 0" in capsys.readouterr().out
    assert (out / ARCHIVE_NAME).read_bytes() == PAYLOAD


@pytest.mark.parametrize("note", [{"url": "http://mirror.example/DAVIS-2017-trainval-480p.zip", "size": 999}, None],
                         ids=["another URL", "no note"])
def test_a_partial_download_of_something_else_is_restarted_and_said_so(tmp_path, capsys, note):
    out = tmp_path / "data"
    out.mkdir()
    (out / (ARCHIVE_NAME + ".part")).write_bytes(b"x" * 100)
    if note:
        (out / (ARCHIVE_NAME + ".part.json")).write_text(json.dumps(note))
    with serve(PAYLOAD) as server:
        assert run("davis2017", "--out", out, archives=catalogue(server["url"])) == 0
        assert server["requests"] == [(None, len(PAYLOAD))]  # no Range: nothing of the old part is kept
    expected = "a partial download of http://mirror.example/" if note else "a partial download of unknown origin"
    assert expected in capsys.readouterr().out and (out / ARCHIVE_NAME).read_bytes() == PAYLOAD


def test_a_part_of_a_file_that_changed_size_on_the_server_is_restarted(tmp_path, capsys):
    """No published size (the unsupervised archive): the note's size is what tells the file changed."""
    out = tmp_path / "data"
    out.mkdir()
    with serve(PAYLOAD) as server:
        (out / (ARCHIVE_NAME + ".part")).write_bytes(PAYLOAD[:100])
        (out / (ARCHIVE_NAME + ".part.json")).write_text(json.dumps({"url": server["url"], "size": 999_999}))
        assert run("davis2017", "--out", out, archives=catalogue(server["url"], payload=None)) == 0
        assert server["requests"] == [("bytes=100-", len(PAYLOAD) - 100), (None, len(PAYLOAD))]
    assert f"the file is now {len(PAYLOAD)} bytes, the part was of 999999; starting again" in capsys.readouterr().out
    assert (out / ARCHIVE_NAME).read_bytes() == PAYLOAD


def test_a_wrong_checksum_deletes_the_download_and_leaves_nothing_unpacked(tmp_path, capsys):
    out = tmp_path / "data"
    with serve(PAYLOAD) as server:
        assert run("davis2017", "--out", out, archives=catalogue(server["url"], sha256="0" * 64)) == 1
    line = one_error_line(capsys)
    assert f"{out / ARCHIVE_NAME}.part: sha256 {hashlib.sha256(PAYLOAD).hexdigest()}, expected {'0' * 64}" in line
    assert "deleted the download: rerun to download it again, or download it by hand and pass --archive" in line
    assert list(out.iterdir()) == []


def test_a_server_file_of_the_wrong_size_is_refused_before_it_is_downloaded(tmp_path, capsys):
    out = tmp_path / "data"
    with serve(PAYLOAD) as server:
        assert run("davis2017", "--out", out, archives=catalogue(server["url"], size=len(PAYLOAD) + 1)) == 1
        assert f"{server['url']} is {len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}" in one_error_line(capsys)
    assert list(out.iterdir()) == []


def test_too_little_free_disk_is_said_before_anything_is_downloaded(tmp_path, capsys):
    out = tmp_path / "data"
    with serve(PAYLOAD) as server:
        assert run("davis2017", "--out", out, archives=catalogue(server["url"], size=10 ** 15)) == 1
        assert server["requests"] == []
    assert "the archive and its unpacked folder need about 2000000000.0 MB more" in one_error_line(capsys)


@pytest.mark.parametrize("size_known", [True, False])
def test_a_truncated_archive_given_by_hand_is_refused(tmp_path, capsys, size_known):
    truncated = tmp_path / ARCHIVE_NAME
    truncated.write_bytes(PAYLOAD[: len(PAYLOAD) // 2])
    out = tmp_path / "data"
    archives = catalogue("http://127.0.0.1:9/unused", size=len(PAYLOAD) if size_known else None, sha256=None)
    assert run("davis2017", "--out", out, "--archive", truncated, archives=archives) == 1
    line = one_error_line(capsys)
    if size_known:
        assert f"{truncated} is {len(PAYLOAD) // 2} bytes, expected {len(PAYLOAD)}" in line
    else:
        assert f"{truncated}: not a complete zip archive" in line
    assert list(out.iterdir()) == [] and truncated.exists()  # the user's file is never deleted


def test_an_archive_without_annotations_names_what_is_missing_and_unpacks_nothing(tmp_path, capsys):
    archive = tmp_path / ARCHIVE_NAME
    archive.write_bytes(davis_zip(masks=None))
    out = tmp_path / "data"
    assert run("davis2017", "--out", out, "--archive", archive,
               archives=catalogue("http://127.0.0.1:9/unused", payload=None)) == 1
    assert f"{archive} (DAVIS/): no Annotations/480p (the masks, <sequence>/*.png)" in one_error_line(capsys)
    assert list(out.iterdir()) == []


def test_an_existing_folder_without_annotations_is_reported_not_overwritten(tmp_path, capsys):
    out = tmp_path / "data"
    (out / "DAVIS" / "JPEGImages" / "480p").mkdir(parents=True)
    assert run("davis2017", "--out", out, archives=catalogue("http://127.0.0.1:9/unused")) == 1
    line = one_error_line(capsys)
    assert f"{out / 'DAVIS'}: no Annotations/480p" in line and "exists but is incomplete: delete it" in line


def test_unsupervised_records_the_first_checksum_and_checks_the_archive_against_it(tmp_path, capsys):
    payload = davis_zip(masks="Annotations_unsupervised")
    name = "DAVIS-2017-Unsupervised-trainval-480p.zip"
    out = tmp_path / "data"
    with serve(payload, name) as server:
        archives = {"davis2017-unsupervised": dataclasses.replace(datasets.ARCHIVES["davis2017-unsupervised"],
                                                                  url=server["url"])}
        assert run("davis2017-unsupervised", "--out", out, archives=archives) == 0
    digest = hashlib.sha256(payload).hexdigest()
    printed = capsys.readouterr().out
    assert f"no published checksum; recorded its sha256 {digest}" in printed
    # pack.py keeps only Annotations/: the unsupervised masks are scored from the folder itself
    assert f"python eval/run.py discovery --ckpt RUN --data {out / 'DAVIS-unsupervised'}" in printed
    assert "pack.py" not in printed
    assert (out / "DAVIS-unsupervised" / "Annotations_unsupervised" / "480p" / "dog").is_dir()
    damaged = bytearray(payload)
    damaged[100] ^= 0xFF
    (out / name).write_bytes(bytes(damaged))
    (out / "DAVIS-unsupervised").rename(out / "moved")
    assert run("davis2017-unsupervised", "--out", out, archives=archives) == 1
    line = one_error_line(capsys)
    assert f"{out / name}: sha256 " in line and f"expected {digest} (recorded in {out / name}.sha256)" in line
    (out / name).unlink()  # a new download is checked against the record too, not recorded afresh
    with serve(bytes(damaged), name) as server:
        archives = {"davis2017-unsupervised": dataclasses.replace(archives["davis2017-unsupervised"],
                                                                  url=server["url"])}
        assert run("davis2017-unsupervised", "--out", out, archives=archives) == 1
    assert f"expected {digest} (recorded in {out / name}.sha256); deleted the download" in one_error_line(capsys)


def test_dry_run_says_what_and_how_big_and_touches_nothing(tmp_path, capsys):
    assert run("davis2017", "--out", tmp_path / "data", "--dry-run") == 0
    printed = capsys.readouterr().out
    assert f"would download {datasets.DAVIS_SITE}{ARCHIVE_NAME} (832.8 MB)" in printed
    assert "TensorFlow Datasets" in printed and not (tmp_path / "data").exists()


# --- folders the user downloaded ---------------------------------------------------------------------


def write_jpgs(folder, count):
    folder.mkdir(parents=True)
    for t in range(count):
        Image.new("RGB", (16, 16)).save(folder / f"{t:05d}.jpg")


def test_youtube_vos_counts_checks_meta_json_and_prints_the_pack_command(tmp_path, capsys):
    train = tmp_path / "youtube-vos" / "train"
    write_jpgs(train / "JPEGImages" / "v1", 3)
    write_jpgs(train / "JPEGImages" / "v2", 2)
    (train / "Annotations" / "v1").mkdir(parents=True)
    Image.new("P", (16, 16)).save(train / "Annotations" / "v1" / "00000.png")
    (train / "meta.json").write_text(json.dumps({"videos": {"v1": {}, "v2": {}, "v3": {}}}))
    assert run("youtube-vos", "--src", tmp_path / "youtube-vos") == 0
    printed = capsys.readouterr().out
    assert f"{train / 'JPEGImages'}: 2 videos, 5 frames" in printed
    assert "masks for 1 of the 2 videos" in printed
    assert "warning: 1 videos listed in meta.json have no frames: v3" in printed
    command = printed.split("pack it", 1)[1].splitlines()[1]
    assert f"--src {train / 'JPEGImages'}" in command and "--fps 6" in command
    pack_accepts(command)


def test_youtube_vos_without_annotations_is_a_warning_without_frames_an_error(tmp_path, capsys):
    train = tmp_path / "ytvos" / "train"
    write_jpgs(train / "JPEGImages" / "v1", 2)
    assert run("youtube-vos", "--src", tmp_path / "ytvos") == 0
    assert f"warning: {train}: no Annotations folder" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("youtube-vos", "--src", empty) == 1
    assert f"{empty}: no train/JPEGImages" in one_error_line(capsys)


def test_kinetics_class_folders_loose_files_and_the_pack_command(tmp_path, capsys):
    src = tmp_path / "k400" / "train"
    for rel in ("abseiling/a.mp4", "abseiling/b.mp4", "zumba/c.mkv", "loose.mp4", "abseiling/notes.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"")  # finding videos never opens them
    assert run("kinetics", "--src", src) == 0
    printed = capsys.readouterr().out
    assert f"{src}: 4 videos, 2 classes (labels from the class folders)" in printed
    assert "warning: 1 videos sit directly in" in printed and "loose.mp4" in printed
    assert "warning: 1 files will be skipped by pack.py: abseiling/notes.txt" in printed
    pack_accepts(printed.split("pack it:", 1)[1].splitlines()[1])


def test_kinetics_with_a_labels_csv_and_the_official_annotation_csv_refused(tmp_path, capsys):
    src = tmp_path / "flat"
    src.mkdir()
    (src / "x.mp4").write_bytes(b"")
    (src / "y.mp4").write_bytes(b"")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nx.mp4,abseiling\n")
    assert run("kinetics", "--src", src, "--labels", labels) == 0
    printed = capsys.readouterr().out
    assert f"{src}: 1 videos, 1 classes (labels from {labels})" in printed and "no label: not listed" in printed
    command = printed.split("pack it:", 1)[1].splitlines()[1]
    assert f"--labels {labels}" in command
    pack_accepts(command)
    official = tmp_path / "train.csv"
    official.write_text("label,youtube_id,time_start,time_end,split\nabseiling,x,0,10,train\n")
    assert run("kinetics", "--src", src, "--labels", official) == 2
    assert "is the official Kinetics annotation CSV" in one_error_line(capsys)


def test_walking_tours_probes_each_video_and_prints_a_long_pack_command(tmp_path, capsys, grey_video):
    src = tmp_path / "wt"
    grey_video(src / "venice.mp4", frames=20, fps=10)
    (src / "broken.mp4").write_bytes(b"not a video")
    assert run("walking-tours", "--src", src) == 0
    printed = capsys.readouterr().out
    assert f"{src}: 1 videos, 0.00 h" in printed and "warning: 1 videos do not open" in printed
    command = printed.split("pack it", 1)[1].splitlines()[1]
    assert "--kind long" in command and "--clip-seconds 10" in command
    pack_accepts(command)
