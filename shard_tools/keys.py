"""Sample keys: `<dataset>_<video-id>_<segment:05d>`, limited to `[A-Za-z0-9_-]`.

webdataset and DALI both take a member's extension to be everything after the first dot of its
name, so a key must never contain a dot; path separators would create tar directories.
"""
from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# A tar member name must fit the 100-byte ustar name field (one 512-byte header, which is what
# DALI's index offsets assume): key + "." + the longest extension we write ("nframes.i32").
MAX_KEY_LEN = 80


def sanitize_key(text: str, max_len: int = MAX_KEY_LEN) -> str:
    """Replace every character outside `[A-Za-z0-9_-]` by `-`; shorten long text with a hash.

    >>> sanitize_key("abseiling/-3B32lodo2M_000059.mp4")
    'abseiling--3B32lodo2M_000059-mp4'
    """
    safe = _UNSAFE.sub("-", text)
    if len(safe) > max_len:
        digest = short_hash(text)
        safe = safe[: max_len - len(digest) - 1] + "-" + digest
    return safe


def short_hash(text: str) -> str:
    """8 hex digits identifying `text` (used to disambiguate colliding or shortened keys)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def sample_key(dataset: str, video_id: str, segment: int) -> str:
    """The key of segment `segment` of video `video_id` in dataset `dataset`."""
    return f"{sanitize_key(dataset, 24)}_{sanitize_key(video_id, MAX_KEY_LEN - 31)}_{segment:05d}"


def unique_video_ids(sources: list[str]) -> dict[str, str]:
    """Map each source path (relative, with extension) to a sanitised video id, unique across all.

    The id is the path without its extension, sanitised. Two sources that sanitise to the same id
    (`a b.mp4` and `a-b.mp4`, or `x.mp4` and `x.mkv`) both get the hash of their full path appended,
    so no sample silently overwrites another.
    """
    def stem(path: str) -> str:
        base, dot, ext = path.rpartition(".")
        return base if dot and "/" not in ext else path

    ids = {src: sanitize_key(stem(src), MAX_KEY_LEN - 31) for src in sources}
    counts: dict[str, int] = {}
    for vid in ids.values():
        counts[vid] = counts.get(vid, 0) + 1
    return {src: (vid if counts[vid] == 1 else sanitize_key(f"{vid}-{short_hash(src)}", MAX_KEY_LEN - 31))
            for src, vid in ids.items()}
