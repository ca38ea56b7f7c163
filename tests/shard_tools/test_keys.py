import re

from shard_tools.keys import MAX_KEY_LEN, sample_key, sanitize_key, unique_video_ids

SAFE = re.compile(r"^[A-Za-z0-9_-]+$")


def test_sanitize_replaces_dots_separators_and_unicode():
    assert sanitize_key("abseiling/-3B32lodo2M_000059.mp4") == "abseiling--3B32lodo2M_000059-mp4"
    assert sanitize_key("a b\\c.d/é") == "a-b-c-d--"


def test_long_text_is_shortened_with_a_distinguishing_hash():
    a, b = sanitize_key("x" * 200 + "1"), sanitize_key("x" * 200 + "2")
    assert len(a) == len(b) == MAX_KEY_LEN and a != b and SAFE.match(a)


def test_sample_key_layout_and_member_name_fits_one_tar_header():
    key = sample_key("kinetics.400", "some/very.long" * 20, 7)
    assert SAFE.match(key) and key.startswith("kinetics-400_") and key.endswith("_00007")
    assert len(f"{key}.nframes.i32") <= 100        # one 512-byte ustar header, as DALI's index assumes


def test_colliding_video_ids_are_made_unique():
    ids = unique_video_ids(["a b.mp4", "a-b.mp4", "x.mp4", "x.mkv", "cls/y.webm"])
    assert len(set(ids.values())) == 5
    assert ids["cls/y.webm"] == "cls-y"
    assert ids["a b.mp4"].startswith("a-b-") and ids["x.mkv"].startswith("x-")
