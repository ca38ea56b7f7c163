"""Get the collections densevid trains and evaluates on: one command per collection.

    python -m shard_tools.datasets davis2017 --out data/           # 832.8 MB download -> data/DAVIS
    python -m shard_tools.datasets davis2017 --out data/ --archive ~/Downloads/DAVIS-2017-trainval-480p.zip
    python -m shard_tools.datasets davis2017-unsupervised --out data/   # -> data/DAVIS-unsupervised
    python -m shard_tools.datasets youtube-vos --src youtube-vos/    # check a folder you downloaded
    python -m shard_tools.datasets kinetics --src kinetics400/train [--labels path_label.csv]
    python -m shard_tools.datasets walking-tours --src walking_tours/

DAVIS: the official archive is downloaded from the DAVIS site into --out (add --dry-run to see what and
how big first; nothing is downloaded without a command that asks for it), checked against its size and
SHA-256, unpacked into a temporary folder, checked (JPEGImages/480p, the masks, ImageSets/2017 train and
val) and only then renamed to its final name, so --out never holds a half-unpacked folder. An interrupted
download is kept as `<archive>.part` beside a note of what it is a part of (`.part.json`: URL and size);
the same command resumes it when the server honours HTTP Range requests, and starts again, saying so,
when it does not or when the part belongs to another URL or size. Two parts are never mixed. A
download whose checksum is wrong is deleted. The checksums: DAVIS publishes none. The trainval archive's
size and SHA-256 are the ones TensorFlow Datasets recorded for the same URL; for the unsupervised
archive no source records either, so the SHA-256 of its first complete download is written to
`<archive>.sha256` and every later run, or new download, is checked against that record.

YouTube-VOS, Kinetics and Walking Tours are not downloaded by this tool (YouTube-VOS needs a CodaLab
login, Kinetics comes from YouTube, Walking Tours from its authors): point --src at the folder you
downloaded; the command checks its layout, reports what it found and what is wrong, and prints the
`shard_tools/pack.py` command that packs it. Nothing is written.

Exit status: 0 done (or already done), 1 the data is wrong or incomplete (download cut short, wrong
size or checksum, missing folders, nothing to pack), 2 a bad command line (nothing downloaded or
written).
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Only light imports here: the command line is checked before the video tools (PyAV) are imported.
import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path, PurePosixPath  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

import shard_tools  # noqa: E402
from shard_tools.cli import ArgumentParser, fail, progress  # noqa: E402
from shard_tools.writer import sha256_file  # noqa: E402

DAVIS_SITE = "https://data.vision.ee.ethz.ch/csergi/share/davis/"
NETWORK_TIMEOUT_S = 60
CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """A collection this tool downloads: where it is, what its bytes must be, what it unpacks to."""
    url: str
    size: int | None        # bytes; None where no source records it
    sha256: str | None      # None where no source records it: the first complete download's is kept
    checksum_source: str    # who recorded size and sha256 (shown by --help and --dry-run)
    top: str                # the archive's top folder
    folder: str             # what that folder is renamed to under --out
    masks: str              # the annotation folder of the layout (next to JPEGImages)
    next_commands: tuple[str, ...]  # what to run on the unpacked folder (DATA stands for it)

    @property
    def file_name(self) -> str:
        return PurePosixPath(urlparse(self.url).path).name


ARCHIVES = {
    "davis2017": Archive(
        url=DAVIS_SITE + "DAVIS-2017-trainval-480p.zip", size=832_766_765,
        sha256="e3d0b5b77c3d031b000a19e0e25e3e2cac65d183755601bc2cf066df1a2aa492",
        checksum_source="as recorded by TensorFlow Datasets (tensorflow_datasets/video/davis/checksums.tsv); "
                        "DAVIS publishes no checksum",
        top="DAVIS", folder="DAVIS", masks="Annotations",
        next_commands=("python shard_tools/pack.py --kind frames --src DATA --subset DATA/ImageSets/2017/val.txt "
                       "--out shards/davis-val",
                       "python eval/run.py labelprop --ckpt RUN --data DATA")),
    "davis2017-unsupervised": Archive(
        url=DAVIS_SITE + "DAVIS-2017-Unsupervised-trainval-480p.zip", size=None, sha256=None,
        checksum_source="none published: the SHA-256 of the first complete download is recorded in "
                        "<archive>.sha256 and later runs are checked against it",
        top="DAVIS", folder="DAVIS-unsupervised", masks="Annotations_unsupervised",
        # pack.py keeps Annotations/ only: discovery reads the unsupervised masks from the folder itself
        next_commands=("python eval/run.py discovery --ckpt RUN --data DATA",)),
}


class DataError(Exception):
    """The data is wrong or incomplete (not the command line): one `error:` line, exit status 1."""


def _mb(size: int | None) -> str:
    return "size unknown" if size is None else f"{size / 1e6:.1f} MB"


def _command(*words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


# --- download ----------------------------------------------------------------------------------------


def _open(url: str, start: int, validator: str | None):
    headers = {"User-Agent": f"densevid-shard_tools/{shard_tools.__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
        if validator:  # the server sends the whole file instead of the rest when it changed since
            headers["If-Range"] = validator
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=NETWORK_TIMEOUT_S)


def _resume_point(part: Path, note: Path, url: str, size: int | None) -> tuple[int, dict]:
    """Bytes of `part` that belong to this download (0: start again) and its note (url, size, validator)."""
    if not part.exists():
        return 0, {}
    have = part.stat().st_size
    previous = json.loads(note.read_text(encoding="utf-8")) if note.exists() else None
    if previous is None:
        print(f"{part}: a partial download of unknown origin (no {note.name}); starting again")
        return 0, {}
    if previous.get("url") != url or (size is not None and previous.get("size") != size):
        print(f"{part}: a partial download of {previous.get('url')} ({_mb(previous.get('size'))}), not of "
              f"{url} ({_mb(size)}); starting again")
        return 0, {}
    if size is not None and have > size:
        print(f"{part}: {have} bytes, more than the {size} of the whole file; starting again")
        return 0, {}
    return have, previous


def download(url: str, part: Path, size: int | None, quiet: bool = False) -> None:
    """Stream `url` into `part`, resuming an earlier partial download of the same URL and size.

    `<part>.json` records what `part` is a part of before any byte is appended. Raises DataError,
    keeping the part and its note for a resume, when the transfer stops early.
    """
    note = part.with_name(part.name + ".json")
    start, previous = _resume_point(part, note, url, size)
    if size is not None and start == size:
        return  # complete already: an earlier run stopped between the last byte and the checks
    response = _open_or_fail(url, start, previous.get("validator"))
    try:
        total = _total_size(response, url, start, part)
        if start and response.status == 206 and previous.get("size") not in (None, total):
            # Without a published size, only the note tells that the server's file changed since.
            print(f"{url}: the file is now {total} bytes, the part was of {previous['size']}; starting again")
            response.close()
            response = _open_or_fail(url, 0, None)
            start, total = 0, _total_size(response, url, 0, part)
        if start and response.status != 206:
            print(f"{url}: the server sent the whole file instead of the rest (HTTP {response.status}: it "
                  "does not resume downloads); starting again from byte 0")
            start = 0
        if size is not None and total is not None and total != size:
            raise DataError(f"{url} is {total} bytes, expected {size}: not the archive this command expects "
                            "(another file under that name, or an error page); check the URL (--url)")
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        note.write_text(json.dumps({"url": url, "size": total if total is not None else size,
                                    "validator": validator}), encoding="utf-8")
        received = start
        with open(part, "ab" if start else "wb") as sink, \
                progress(total=total, initial=start, unit="B", unit_scale=True, desc=part.name,
                         disable=True if quiet else None) as bar:
            while block := response.read(CHUNK):
                sink.write(block)
                received += len(block)
                bar.update(len(block))
    except (OSError, http.client.HTTPException) as err:  # timeout, reset: what arrived is kept
        got = part.stat().st_size if part.exists() else 0
        raise DataError(f"download of {url} failed after {got} bytes ({err}); rerun the same command to "
                        f"resume (the part is kept in {part})") from None
    finally:
        response.close()
    # http.client does not raise when the connection closes before Content-Length is reached.
    if total is not None and received != total:
        raise DataError(f"download of {url} stopped at {received} of {total} bytes; rerun the same command "
                        f"to resume (the part is kept in {part})")


def _open_or_fail(url: str, start: int, validator: str | None):
    try:
        try:
            return _open(url, start, validator)
        except urllib.error.HTTPError as err:
            if err.code != 416 or not start:
                raise
            # 416: the part is at least as long as the file, so it is not a part of this file.
            print(f"{url}: the server has no bytes after the {start} already downloaded; starting again")
            return _open(url, 0, None)
    except urllib.error.HTTPError as err:
        raise DataError(f"{url}: HTTP {err.code} {err.reason}; check the URL (--url)") from None
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"{url}: cannot connect ({getattr(err, 'reason', err)}); check the network and "
                        "rerun the same command") from None


def _total_size(response, url: str, start: int, part: Path) -> int | None:
    """The whole file's size, from Content-Range (a resumed transfer) or Content-Length (None: not sent)."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
        first = content_range.removeprefix("bytes ").split("-")[0]
        total = content_range.rsplit("/", 1)[-1]
        if not (first.isdigit() and int(first) == start and total.isdigit()):
            raise DataError(f"{url}: the server answered the resume request with Content-Range "
                            f"{content_range!r}; delete {part} and rerun to download from the start")
        return int(total)
    length = response.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


def _checksum_record(archive_path: Path) -> Path:
    return archive_path.with_name(archive_path.name + ".sha256")


def verify(path: Path, archive: Archive, record: Path) -> str:
    """Check `path`'s size and SHA-256 against the catalogue, or where it has none against `record`
    (the first download's, when there was one); returns the SHA-256. Raises DataError naming the file."""
    got_size = path.stat().st_size
    if archive.size is not None and got_size != archive.size:
        raise DataError(f"{path} is {got_size} bytes, expected {archive.size}")
    digest = sha256_file(path)
    expected, source = archive.sha256, archive.checksum_source
    if expected is None and record.exists():
        expected, source = record.read_text(encoding="utf-8").split()[0], f"recorded in {record}"
    if expected is not None and digest != expected:
        raise DataError(f"{path}: sha256 {digest}, expected {expected} ({source})")
    return digest


def fetch_archive(archive: Archive, url: str, out: Path, quiet: bool) -> Path:
    """The verified archive in `out`: already there, or downloaded (resuming a part) and verified."""
    final = out / archive.file_name
    if not final.exists():
        part = final.with_name(final.name + ".part")
        if archive.size is not None:  # the archive and its unpacked copy (JPEGs and PNGs barely compress)
            needed = 2 * archive.size - (part.stat().st_size if part.exists() else 0)
            free = shutil.disk_usage(out).free
            if free < needed:
                raise DataError(f"{out}: {_mb(free)} free, the archive and its unpacked folder need about "
                                f"{_mb(needed)} more; free some space or choose another --out")
        print(f"downloading {url} ({_mb(archive.size)}) to {part}")
        download(url, part, archive.size, quiet)
        try:
            digest = verify(part, archive, _checksum_record(final))
        except DataError as err:  # a complete but wrong file: resuming it cannot help
            part.unlink()
            part.with_name(part.name + ".json").unlink(missing_ok=True)
            raise DataError(f"{err}; deleted the download: rerun to download it again, or download it "
                            f"by hand and pass --archive FILE") from None
        _checksum_record(final).write_text(f"{digest}  {final.name}\n", encoding="utf-8")
        os.replace(part, final)
        part.with_name(part.name + ".json").unlink()
        if archive.sha256 is None:
            print(f"{final}: no published checksum; recorded its sha256 {digest} in {_checksum_record(final)}")
        return final
    try:
        verify(final, archive, _checksum_record(final))
    except DataError as err:
        raise DataError(f"{err}; delete it and rerun to download it again") from None
    print(f"{final}: already downloaded, size and checksum match")
    return final


# --- DAVIS layout ------------------------------------------------------------------------------------


def check_davis(root: Path, masks: str, shown_as: str | None = None) -> dict:
    """Counts of a DAVIS-2017 480p folder: {sequences, train, val, frames, masks}. Raises DataError
    naming the folder (`shown_as`, default its path) and what is missing."""
    shown_as = shown_as or str(root)
    frames_dir, masks_dir = root / "JPEGImages" / "480p", root / masks / "480p"
    sets_dir = root / "ImageSets" / "2017"
    for folder, what in ((frames_dir, "the frames, <sequence>/*.jpg"), (masks_dir, "the masks, <sequence>/*.png"),
                         (sets_dir, "the subsets, train.txt and val.txt")):
        if not folder.is_dir():
            raise DataError(f"{shown_as}: no {folder.relative_to(root)} ({what})")
    subsets = {}
    for subset in ("train", "val"):
        listed = sets_dir / f"{subset}.txt"
        if not listed.is_file():
            raise DataError(f"{shown_as}: no ImageSets/2017/{subset}.txt")
        subsets[subset] = listed.read_text(encoding="utf-8").split()
    frames = masks_found = 0
    for name in sorted({n for names in subsets.values() for n in names}):
        jpgs = sorted((frames_dir / name).glob("*.jpg"))
        pngs = {p.stem for p in (masks_dir / name).glob("*.png")}
        if not jpgs:
            raise DataError(f"{shown_as}: sequence {name} (listed in ImageSets/2017) has no frames in "
                            f"{frames_dir.relative_to(root) / name}")
        if jpgs[0].stem not in pngs:
            raise DataError(f"{shown_as}: sequence {name} has no mask of its first frame "
                            f"({masks_dir.relative_to(root) / name / jpgs[0].stem}.png)")
        frames += len(jpgs)
        masks_found += len(pngs)
    return {"sequences": len(set(subsets["train"]) | set(subsets["val"])), "train": len(subsets["train"]),
            "val": len(subsets["val"]), "frames": frames, "masks": masks_found}


def unpack(archive_path: Path, archive: Archive, out: Path) -> dict:
    """Unpack into a temporary folder, check the layout, then rename to `<out>/<folder>`; returns the counts.
    Whatever fails, `out` keeps no half-unpacked folder."""
    staging = out / f".{archive.folder}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed earlier run
    try:
        try:
            with zipfile.ZipFile(archive_path) as zipped:
                zipped.extractall(staging)  # extractall drops absolute paths and ".." from member names
        except (zipfile.BadZipFile, EOFError) as err:
            raise DataError(f"{archive_path}: not a complete zip archive ({err}); download it again") from None
        root = staging / archive.top
        if not root.is_dir():
            found = ", ".join(sorted(p.name for p in staging.iterdir())) if staging.exists() else ""
            raise DataError(f"{archive_path}: expected a top folder {archive.top}/, found {found or 'nothing'}")
        counts = check_davis(root, archive.masks, shown_as=f"{archive_path} ({archive.top}/)")
        os.replace(root, out / archive.folder)
        return counts
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_davis(archive: Archive, args: argparse.Namespace) -> int:
    out = Path(args.out)
    url = args.url or archive.url
    dest = out / archive.folder
    next_steps = "next:\n" + "\n".join(f"  {c.replace('DATA', shlex.quote(str(dest)))}" for c in archive.next_commands)
    if dest.exists():
        try:
            counts = check_davis(dest, archive.masks)
        except DataError as err:
            raise DataError(f"{err}; {dest} exists but is incomplete: delete it and rerun") from None
        print(f"{dest}: already prepared: {_counts_line(counts)}\n{next_steps}")
        return 0
    source = Path(args.archive) if args.archive else out / archive.file_name
    if args.dry_run:
        part = out / (archive.file_name + ".part")
        if args.archive or source.exists():
            print(f"would check {source} ({_mb(archive.size)}, sha256 {archive.sha256 or 'not published'})")
        else:
            resume = f", resuming {part} ({part.stat().st_size} bytes)" if part.exists() else ""
            print(f"would download {url} ({_mb(archive.size)}) to {out / archive.file_name}{resume}\n"
                  f"  sha256 {archive.sha256 or 'not published'}: {archive.checksum_source}")
        print(f"would unpack it to {dest} and check JPEGImages/480p, {archive.masks}/480p, ImageSets/2017; "
              "nothing was downloaded or written")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.archive:
        try:
            digest = verify(source, archive, _checksum_record(source))
        except DataError as err:
            raise DataError(f"{err}: truncated, damaged or not {archive.file_name}; download it again") from None
        print(f"{source}: size and checksum match" if archive.sha256 else f"{source}: sha256 {digest} "
              "(no published checksum to compare with)")
    else:
        source = fetch_archive(archive, url, out, args.quiet)
    counts = unpack(source, archive, out)
    print(f"{dest}: {_counts_line(counts)}\n{next_steps}")
    if not args.archive:
        print(f"(the archive {source} may be deleted; it is kept so that a rerun needs no download)")
    return 0


def _counts_line(counts: dict) -> str:
    return (f"{counts['sequences']} sequences (train {counts['train']}, val {counts['val']}), "
            f"{counts['frames']} frames, {counts['masks']} masks")


# --- folders the user downloaded ---------------------------------------------------------------------


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


def _list(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_youtube_vos(src: Path) -> int:
    """YouTube-VOS: `train/JPEGImages/<video>/*.jpg`, `train/Annotations/<video>/*.png`, `train/meta.json`
    (and `train_all_frames/JPEGImages` when downloaded)."""
    train = src if (src / "JPEGImages").is_dir() and not (src / "train").is_dir() else src / "train"
    frames_dir = train / "JPEGImages"
    if not frames_dir.is_dir():
        raise DataError(f"{src}: no {frames_dir.relative_to(src)} (<video>/*.jpg, from the YouTube-VOS train.zip)")
    counts = {p.name: len(list(p.glob("*.jpg"))) for p in sorted(frames_dir.iterdir()) if p.is_dir()}
    videos = [name for name, n in counts.items() if n]
    if not videos:
        raise DataError(f"{frames_dir}: no video folder holds .jpg frames")
    print(f"{frames_dir}: {len(videos)} videos, {sum(counts.values())} frames")
    if len(videos) < len(counts):
        print(f"warning: {len(counts) - len(videos)} video folders hold no .jpg: "
              f"{_list([n for n, c in counts.items() if not c])}")
    masks_dir = train / "Annotations"
    if masks_dir.is_dir():
        masked = {p.name for p in masks_dir.iterdir() if p.is_dir() and any(p.glob("*.png"))}
        print(f"{masks_dir}: masks for {len(masked & set(videos))} of the {len(videos)} videos")
    else:
        print(f"warning: {train}: no Annotations folder (the masks, <video>/*.png): the train.zip is not "
              "completely unpacked; training needs only the frames, so packing works without it")
    meta = train / "meta.json"
    if meta.is_file():
        listed = set(json.loads(meta.read_text(encoding="utf-8")).get("videos", {}))
        missing, unlisted = sorted(listed - set(videos)), sorted(set(videos) - listed)
        print(f"{meta}: {len(listed)} videos listed")
        if missing:
            print(f"warning: {len(missing)} videos listed in meta.json have no frames: {_list(missing)}")
        if unlisted:
            print(f"warning: {len(unlisted)} video folders are not listed in meta.json: {_list(unlisted)}")
    else:
        print(f"warning: {train}: no meta.json (the object list of each video)")
    all_frames = src / "train_all_frames" / "JPEGImages"
    if all_frames.is_dir():  # every frame of the 30 fps videos, not every 5th: more training data
        command = _command("python", "shard_tools/pack.py", "--kind", "frames", "--src", all_frames, "--out",
                           "shards/ytvos-train", "--fps", 30, "--short-side", 256, "--workers", _workers())
    else:
        command = _command("python", "shard_tools/pack.py", "--kind", "frames", "--src", frames_dir, "--out",
                           "shards/ytvos-train", "--fps", 6, "--short-side", 256, "--workers", _workers())
    print(f"pack it (the released train frames are every 5th frame of 30 fps video; train_all_frames holds "
          f"them all):\n  {command}")
    return 0


KINETICS_ANNOTATION_HEADER = ["label", "youtube_id", "time_start", "time_end"]


def check_kinetics(src: Path, labels: str | None) -> int:
    """Kinetics: class folders of videos (`<class>/<id>.mp4`), or a flat folder and a `path,label` CSV."""
    from shard_tools.sources import find_videos  # PyAV comes with it: imported once the arguments are good

    try:
        sources, skipped = find_videos(src, labels)
    except (OSError, ValueError) as err:
        raise DataError(str(err)) from None
    if not sources:
        reasons = _list([f"{s['path']}: {s['reason']}" for s in skipped], 2)
        raise DataError(f"{src}: no video with a label to pack" + (f" ({reasons})" if skipped else ""))
    classes = sorted({s.label for s in sources if s.label is not None})
    unlabelled = [s.rel for s in sources if s.label is None]
    print(f"{src}: {len(sources)} videos, {len(classes)} classes"
          + (f" (labels from {labels})" if labels else " (labels from the class folders)"))
    if unlabelled:
        print(f"warning: {len(unlabelled)} videos sit directly in {src}, without a class folder, and get no "
              f"label: {_list(unlabelled)}; pass --labels with a path,label CSV (docs/data.md, Kinetics)")
    if skipped:
        reasons = _list([f"{s['path']} ({s['reason']})" for s in skipped])
        print(f"warning: {len(skipped)} files will be skipped by pack.py: {reasons}")
    command = ["python", "shard_tools/pack.py", "--kind", "videos", "--src", src]
    command += ["--labels", labels] if labels else []
    command += ["--out", "shards/kinetics", "--fps", 30, "--short-side", 256, "--workers", _workers()]
    print(f"pack it:\n  {_command(*command)}")
    return 0


def check_walking_tours(src: Path) -> int:
    """Walking Tours: a few long videos, cut into segments by `pack.py --kind long`."""
    from shard_tools.encode import BadInput, probe_video  # PyAV: imported once the arguments are good
    from shard_tools.sources import find_videos

    sources, _ = find_videos(src)
    durations, problems = {}, []
    for source in sources:
        try:
            durations[source.rel] = probe_video(str(src / source.rel)).duration
        except BadInput as err:
            problems.append(f"{source.rel} ({err})")
    if not durations:
        raise DataError(f"{src}: no video that opens" + (f": {_list(problems, 2)}" if problems else ""))
    hours = sum(d for d in durations.values() if d == d) / 3600  # unknown durations (NaN) left out
    print(f"{src}: {len(durations)} videos, {hours:.2f} h")
    if problems:
        print(f"warning: {len(problems)} videos do not open and will be skipped: {_list(problems)}")
    command = _command("python", "shard_tools/pack.py", "--kind", "long", "--src", src, "--out", "shards/wt",
                       "--clip-seconds", 10, "--fps", 10, "--short-side", 360,
                       "--workers", min(_workers(), len(durations)))
    print(f"pack it (10 s segments; for DoRA use --clip-seconds 60, see docs/data.md):\n  {command}")
    return 0


# --- command line ------------------------------------------------------------------------------------


def build_parser(archives: dict[str, Archive]) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m shard_tools.datasets", description=__doc__.split("\n")[0],
                            epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="collection", required=True, metavar="COLLECTION")
    for name, archive in archives.items():
        p = commands.add_parser(name, help=f"download {archive.file_name} ({_mb(archive.size)}) and unpack it to "
                                           f"--out/{archive.folder}",
                                description=f"Download {archive.url} ({_mb(archive.size)}), check its size "
                                            f"and SHA-256 ({archive.checksum_source}), unpack it to "
                                            f"<out>/{archive.folder} and check its layout "
                                            f"(JPEGImages/480p, {archive.masks}/480p, ImageSets/2017).")
        p.add_argument("--out", required=True, help=f"folder for the archive and {archive.folder}/ (created)")
        p.add_argument("--archive", help="an archive you downloaded by hand: checked and unpacked, not copied "
                                         "(nothing is downloaded)")
        p.add_argument("--url", help="download from this URL instead (a mirror: it must serve the same bytes, "
                                     "the size and checksum still apply)")
        p.add_argument("--dry-run", action="store_true", help="say what would be downloaded and how big, "
                                                              "and do nothing")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = commands.add_parser("youtube-vos", help="check a YouTube-VOS folder you downloaded; print the pack command")
    p.add_argument("--src", required=True, help="the folder holding train/ (train/JPEGImages, train/Annotations, "
                                                "train/meta.json), or train/ itself")
    p = commands.add_parser("kinetics", help="check a Kinetics folder you downloaded; print the pack command")
    p.add_argument("--src", required=True, help="class folders of videos (<class>/<id>.mp4), or a flat folder "
                                                "with --labels")
    p.add_argument("--labels", help="CSV of path,label rows, path relative to --src (pack.py --labels)")
    p = commands.add_parser("walking-tours", help="check a folder of long videos; print the pack command")
    p.add_argument("--src", required=True, help="folder of the long videos")
    return parser


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, decided before anything is imported, downloaded or written."""
    if getattr(args, "src", None) is not None and not Path(args.src).is_dir():
        return f"--src {args.src} is not a folder"
    if getattr(args, "archive", None) is not None:
        if not Path(args.archive).is_file():
            return f"--archive {args.archive}: no such file"
        if args.url:
            return "--archive and --url exclude each other: the archive is already here"
    if getattr(args, "out", None) is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out} is a file, not a folder"
    if getattr(args, "url", None) is not None and urlparse(args.url).scheme not in ("http", "https"):
        return f"--url {args.url}: expected an http:// or https:// URL"
    labels = getattr(args, "labels", None)
    if labels is not None:
        if not Path(labels).is_file():
            return f"--labels {labels}: no such file"
        with open(labels, encoding="utf-8") as handle:
            header = [c.strip().lower() for c in handle.readline().split(",")]
        if header[:4] == KINETICS_ANNOTATION_HEADER:
            return (f"--labels {labels} is the official Kinetics annotation CSV (label,youtube_id,...); make a "
                    "path,label CSV from it first (docs/data.md, Kinetics)")
    return None


def main(argv: list[str] | None = None, archives: dict[str, Archive] = ARCHIVES) -> int:
    """`archives` is the catalogue (tests pass one pointing at a local server)."""
    args = build_parser(archives).parse_args(argv)
    problem = _usage_problem(args)
    if problem:
        return fail(problem)
    try:
        if args.collection in archives:
            return prepare_davis(archives[args.collection], args)
        if args.collection == "youtube-vos":
            return check_youtube_vos(Path(args.src))
        if args.collection == "kinetics":
            return check_kinetics(Path(args.src), args.labels)
        return check_walking_tours(Path(args.src))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
