"""Shared test configuration: marker skips and session-scoped synthetic datasets."""
import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_dali = pytest.mark.skip(reason="needs NVIDIA DALI: pip install 'densevid[gpu]'")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "dali" in item.keywords and not has_dali:
            item.add_marker(skip_dali)


# --- Session-scoped synthetic datasets (shard_tools). Each fixture returns a folder Path; build on
# them read-only. Raw data: 6 H.264 videos of 32 frames, 128x96 at 25 fps, in 3 class folders
# (stripes, checker, dots), plus a DAVIS-layout folder of 2 sequences with palette masks.
SYNTH = dict(seed=0, videos=6, classes=3, davis=2, frames=32, width=128, height=96, objects=3, fps=25.0)
# Packed at the source rate and size: every training sample has 32 frames of 128x96.
PACK = ["--fps", "25", "--short-side", "96", "--quiet"]


def _pack(tmp_path_factory, name: str, *args: str):
    from shard_tools import pack

    out = tmp_path_factory.mktemp("shards") / name
    if pack.main([*args, "--out", str(out), *PACK]) != 0:
        raise RuntimeError(f"packing the {name} fixture failed; see {out / 'manifest.json'}")
    return out


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory):
    """Raw synthetic data from shard_tools.synth (see SYNTH): `videos/<class>/<class>_NNN.mp4` and
    `davis/` (JPEGImages/480p, Annotations/480p palette PNGs, ImageSets/2017/val.txt)."""
    from shard_tools.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth") / "raw", **SYNTH)


@pytest.fixture(scope="session")
def davis_dir(synth_raw):
    """The DAVIS-layout evaluation folder of `synth_raw`: 2 sequences (synth00, synth01) of 32
    frames 128x96, objects 1..3 in every first-frame mask."""
    return synth_raw / "davis"


@pytest.fixture(scope="session")
def long_video(tmp_path_factory):
    """One synthetic long video (the Walking Tours stand-in): 4 scenes of 32 frames each, 128x96 at
    25 fps (5.1 s), as `<dir>/walk.mp4`; returns the folder."""
    import numpy as np

    from shard_tools.synth import render_video, write_mp4

    folder = tmp_path_factory.mktemp("long") / "videos"
    scenes = [render_video(seed, 32, 128, 96, 3, kind)[0] for seed, kind in enumerate(["dots", "checker"] * 2)]
    write_mp4(folder / "walk.mp4", np.concatenate(scenes), 25.0)
    return folder


@pytest.fixture(scope="session")
def long_shards(tmp_path_factory, long_video):
    """`--kind long` shards of `long_video` cut into 1.2 s segments: 4 samples of 30 JPEG frames
    (the 8-frame tail is dropped), unlabelled."""
    return _pack(tmp_path_factory, "long", "--kind", "long", "--src", str(long_video), "--clip-seconds", "1.2")


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory, synth_raw):
    """`--kind videos --format jpeg` of the 6 labelled videos: 6 samples of 32 JPEG frames
    (f000.jpg…f031.jpg, 128x96, 25 fps) with cls/label.i32 (checker 0, dots 1, stripes 2), in
    2 or more shards with .idx files and manifest.json."""
    return _pack(tmp_path_factory, "jpeg", "--kind", "videos", "--src", str(synth_raw / "videos"),
                 "--format", "jpeg", "--shard-size", "600000")


@pytest.fixture(scope="session")
def vp9_shards(tmp_path_factory, synth_raw):
    """As `jpeg_shards` but each sample is one `webm` (VP9, GOP 16, 32 frames): DALI can decode
    it on CPU. 2 or more shards."""
    return _pack(tmp_path_factory, "vp9", "--kind", "videos", "--src", str(synth_raw / "videos"),
                 "--format", "vp9", "--shard-size", "300000")


@pytest.fixture(scope="session")
def h264_shards(tmp_path_factory, synth_raw):
    """As `jpeg_shards` but each sample is one `mp4` (H.264 High, closed GOP 16, no B-frames, 32
    frames). DALI decodes it only on GPU; PyAV decodes it on CPU. 2 or more shards."""
    return _pack(tmp_path_factory, "h264", "--kind", "videos", "--src", str(synth_raw / "videos"),
                 "--format", "h264", "--shard-size", "60000")


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory, davis_dir):
    """`--kind frames` of `davis_dir`: 2 evaluation samples holding the original JPEG bytes
    (f000.jpg…f031.jpg) and palette PNG masks (m000.png…m031.png), json `frames`/`masks` names."""
    return _pack(tmp_path_factory, "eval", "--kind", "frames", "--src", str(davis_dir))


@pytest.fixture
def float64():
    """torch's default dtype is float64 for the test (reference-parity checks), restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
