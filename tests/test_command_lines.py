"""The entry points' front door: a bad call is one `error: ...` line, exit status 2, nothing written,
and train/run.py, eval/run.py, pack.py and datasets.py decide it before importing torch; --help shows the defaults that apply."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Runs a script as `python SCRIPT ARGS...` would, then says on stdout whether torch got imported.
RUN_AND_REPORT_TORCH = ("import runpy, sys\nscript = sys.argv.pop(1)\nsys.argv[0] = script\ntry:\n"
                        "    runpy.run_path(script, run_name='__main__')\nfinally:\n"
                        "    print('torch imported' if 'torch' in sys.modules else 'torch not imported')")


def call(script, *args, cwd):
    return subprocess.run([sys.executable, "-c", RUN_AND_REPORT_TORCH, str(REPO / script), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO),
                                                                                     "PATH": "/usr/bin:/bin"})


def assert_one_line_usage_error(proc, *expected):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.fixture
def empty_dataset(tmp_path):
    """A finished packing run that kept no sample (its only source is not a video)."""
    from shard_tools import pack

    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    (src / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "packed"
    assert pack.main(["--kind", "videos", "--src", str(src.parent), "--out", str(out), "--quiet"]) == 1
    return out


@pytest.mark.parametrize("case", ["empty folder", "no samples", "typo", "other method's key", "no --out"])
def test_train_usage_errors_are_one_line_before_torch_and_leave_nothing(case, tmp_path, empty_dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    args, expected = {
        "empty folder": (["--data", empty], [f"--data: {empty}/manifest.json not found",
                                             f"pack.py --src SOURCES --out {empty}"]),
        "no samples": (["--data", empty_dataset], [f"--data {empty_dataset}: the dataset holds no samples"]),
        "typo": (["--data", empty_dataset, "--optim.lrr", "1"], ["--optim.lrr 1; did you mean --optim.lr?"]),
        "other method's key": (["--data", empty_dataset, "--dino.out_dim", "8"], ["belongs to method 'dino'"]),
        "no --out": (["--data", empty_dataset], ["required: --out"]),
    }[case]
    out_args = [] if case == "no --out" else ["--out", out]
    proc = call("train/run.py", "--method", "crw", *out_args, *args, cwd=tmp_path)
    assert_one_line_usage_error(proc, *expected)
    assert proc.stdout.strip() == "torch not imported"
    assert not out.exists()


def test_a_typo_in_the_methods_own_section_is_one_line_with_the_closest_key(tmp_path, jpeg_shards):
    proc = call("train/run.py", "--method", "crw", "--data", jpeg_shards, "--out", tmp_path / "run",
                "--crw.temprature", "0.1", cwd=tmp_path)
    assert_one_line_usage_error(proc, "--crw.temprature; did you mean --crw.temperature?")
    assert not (tmp_path / "run").exists()


def test_eval_on_an_empty_data_folder_names_data_not_davis(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = call("eval/run.py", "clusters", "--ckpt", tmp_path, "--data", tmp_path / "empty",
                "--out", tmp_path / "ev", cwd=tmp_path)
    assert_one_line_usage_error(proc, f"--data {tmp_path / 'empty'}: neither evaluation shards", "--kind frames")
    assert "--davis" not in proc.stderr and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("case", ["no such data", "no --ckpt", "no such ckpt", "typo", "not labelled shards",
                                  "no --data", "negative --fit-points"])
def test_eval_usage_errors_are_one_line_before_torch_and_leave_nothing(case, tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # an existing --ckpt folder: a good call would write <run>/eval/<command>/
    missing = tmp_path / "missing"
    args, expected = {
        "no such data": (["labelprop", "--ckpt", run, "--data", missing],
                         [f"--data {missing}: neither evaluation shards"]),
        "no --ckpt": (["labelprop", "--data", missing], ["--ckpt is required"]),
        "no such ckpt": (["clusters", "--ckpt", missing, "--data", tmp_path], [f"--ckpt {missing}: no such file"]),
        "typo": (["clusters", "--ckpt", run, "--data", tmp_path, "--fit-point", "5"],
                 ["--fit-point 5; did you mean --fit-points?", "eval/run.py clusters --help"]),
        "not labelled shards": (["knn", "--ckpt", run, "--data", tmp_path], [f"--data {tmp_path}: no manifest.json"]),
        "no --data": (["discovery", "--ckpt", run], ["required: --data"]),
        "negative --fit-points": (["clusters", "--ckpt", run, "--data", tmp_path, "--fit-points", "-1"],
                                  ["--fit-points -1"]),
    }[case]
    cwd = tmp_path / "cwd"
    cwd.mkdir()  # a good call without --out and a file --ckpt would write ./eval-<command>/ here
    proc = call("eval/run.py", *args, cwd=cwd)
    assert_one_line_usage_error(proc, *expected)
    assert proc.stdout.strip() == "torch not imported"
    assert not any(cwd.iterdir()) and not any(run.iterdir())


def test_pack_bad_source_is_one_line(tmp_path):
    proc = call("shard_tools/pack.py", "--kind", "videos", "--src", tmp_path / "missing", "--out", tmp_path / "o",
                cwd=tmp_path)
    assert_one_line_usage_error(proc, "--src", "is not a folder")
    assert proc.stdout.strip() == "torch not imported" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["no --out", "typo", "no such archive", "archive and url", "ftp url",
                                  "no such src", "official kinetics csv"])
def test_datasets_usage_errors_are_one_line_before_torch_and_leave_nothing(case, tmp_path):
    out, missing = tmp_path / "data", tmp_path / "missing"
    official = tmp_path / "train.csv"
    official.write_text("label,youtube_id,time_start,time_end,split\n")
    args, expected = {
        "no --out": (["davis2017"], ["the following arguments are required: --out"]),
        "typo": (["davis2017", "--out", out, "--dryrun"], ["--dryrun; did you mean --dry-run?"]),
        "no such archive": (["davis2017", "--out", out, "--archive", missing], [f"--archive {missing}: no such file"]),
        "archive and url": (["davis2017", "--out", out, "--archive", official, "--url", "https://mirror/x.zip"],
                            ["--archive and --url exclude each other"]),
        "ftp url": (["davis2017-unsupervised", "--out", out, "--url", "ftp://mirror/x.zip"], ["http:// or https://"]),
        "no such src": (["youtube-vos", "--src", missing], [f"--src {missing} is not a folder"]),
        "official kinetics csv": (["kinetics", "--src", tmp_path, "--labels", official],
                                  ["the official Kinetics annotation CSV", "docs/data.md"]),
    }[case]
    proc = call("shard_tools/datasets.py", *args, cwd=tmp_path)
    assert_one_line_usage_error(proc, *expected)
    assert proc.stdout.strip() == "torch not imported"
    assert not out.exists()


def test_train_help_shows_the_methods_yaml_defaults(tmp_path):
    proc = call("train/run.py", "--method", "crw", "--help", cwd=tmp_path)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stderr
    options = text.split("data options:", 1)[1]  # past the usage summary
    assert "(default: 0.0001)" in options.split("--optim.lr LR", 1)[1].split("--optim.", 1)[0]
    assert "(default: 20)" in options.split("--data.batch_size BATCH_SIZE", 1)[1].split("--data.", 1)[0]
    assert "--crw.temperature" in text and "--dino.out_dim" not in text  # only the chosen method's section


def test_pack_help_shows_its_defaults(tmp_path):
    text = " ".join(call("shard_tools/pack.py", "--help", cwd=tmp_path).stdout.split())
    assert "of the folders) (default: 30)" in text
    assert "sizes are even (default: 256)" in text
    assert "target shard size in bytes (default: 1e+09)" in text


def test_pack_warns_when_it_would_upscale(tmp_path, synth_raw):
    proc = call("shard_tools/pack.py", "--kind", "videos", "--src", synth_raw / "videos", "--out", tmp_path / "o",
                "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning: 6 of 6 source(s) are smaller than --short-side 256 and were upscaled" in proc.stderr
    assert "128x96); pass --short-side 96" in proc.stderr


def test_learning_refuses_scoring_a_trained_sequence_in_one_line(tmp_path, davis_dir):
    proc = subprocess.run([sys.executable, "-m", "train.learning", "--train-data", str(davis_dir), "--eval-data",
                           f"{davis_dir}:synth01", "--out", str(tmp_path / "bench")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert_one_line_usage_error(proc, "--eval-data sequence(s) synth01 also in --train-data")
    assert not (tmp_path / "bench").exists()
