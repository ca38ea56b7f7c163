"""The learning benchmark on real inputs (train/real_data.py): its argument checks and the packing
of mixed inputs, on the synthetic fixtures (no real data needed)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eval.davis_io import open_sequences
from pipeline.reader import ShardDataset
from shard_tools import pack
from train import learning
from train.real_data import RealData, link_sequences, parse_eval_input, parse_input, prepare_real_data


def refused(capsys, out, *argv):
    """Run the benchmark's argument checks; return its one stderr line (exit 2, nothing written)."""
    with pytest.raises(SystemExit) as exit_:
        learning.main(["--methods", "crw", "dino", "--budget", "cpu", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    return err[0]


def test_a_scored_sequence_in_a_training_davis_folder_is_refused(capsys, tmp_path, davis_dir):
    line = refused(capsys, tmp_path / "bench", "--train-data", str(davis_dir), "--eval-data", f"{davis_dir}:synth00")
    assert "synth00" in line and "synth01" not in line


def test_a_scored_sequence_in_a_packed_training_set_is_refused(capsys, tmp_path, davis_dir):
    subset = tmp_path / "subset.txt"
    subset.write_text("synth01\n")
    shards = tmp_path / "packed"
    assert pack.main(["--kind", "frames", "--src", str(davis_dir / "JPEGImages" / "480p"), "--subset", str(subset),
                      "--out", str(shards), "--short-side", "48", "--quiet"]) == 0
    line = refused(capsys, tmp_path / "bench", "--train-data", str(shards), "--eval-data", str(davis_dir))
    assert "synth01" in line and "synth00" not in line


def test_a_training_video_named_like_a_scored_sequence_is_refused(capsys, tmp_path, davis_dir, synth_raw):
    video = tmp_path / "synth00.mp4"
    shutil.copy(next((synth_raw / "videos").rglob("*.mp4")), video)
    assert "synth00" in refused(capsys, tmp_path / "bench", "--train-data", str(video), "--eval-data", str(davis_dir))


@pytest.mark.parametrize("case", ["missing", "neither", "not a video", "names in a video folder", "eval not DAVIS",
                                  "no eval", "unknown sequence"])
def test_unusable_inputs_are_refused_in_one_line(capsys, tmp_path, davis_dir, synth_raw, case):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("no videos here")
    videos = str(synth_raw / "videos")
    argv, expected = {
        "missing": (["--train-data", str(tmp_path / "nowhere"), "--eval-data", str(davis_dir)], "no such file"),
        "neither": (["--train-data", str(notes), "--eval-data", str(davis_dir)], "neither a video file"),
        "not a video": (["--train-data", str(notes / "readme.txt"), "--eval-data", str(davis_dir)], "not a video"),
        "names in a video folder": (["--train-data", f"{videos}:synth01", "--eval-data", str(davis_dir)],
                                    "DAVIS-layout folders only"),
        "eval not DAVIS": (["--train-data", videos, "--eval-data", videos], "not a DAVIS-layout folder"),
        "no eval": (["--train-data", videos], "go together"),
        "unknown sequence": (["--train-data", videos, "--eval-data", f"{davis_dir}:synth00,bear"], "no sequence bear"),
    }[case]
    assert expected in refused(capsys, tmp_path / "bench", *argv)


def test_mixed_inputs_are_packed_into_one_training_set(tmp_path, synth_raw, davis_dir, jpeg_shards):
    video = next((synth_raw / "videos" / "dots").glob("*.mp4"))
    train = [parse_input(str(video)), parse_input(str(synth_raw / "videos" / "checker")),
             parse_input(f"{davis_dir}:synth01"), parse_input(str(jpeg_shards))]
    assert [t.kind for t in train] == ["video", "videos", "davis", "shards"]
    scored = parse_eval_input(f"{davis_dir}:synth00")
    data = RealData(short_side=48, clip_seconds=0.5)
    shards, davis = prepare_real_data(train, scored, tmp_path, data)

    manifest = json.loads((shards / "manifest.json").read_text())
    parts = [json.loads((shards / part / "manifest.json").read_text()) for part in manifest["parts"]]
    assert len(parts) == 4 and manifest["samples"] == sum(p["samples"] for p in parts) == len(ShardDataset(shards))
    dataset = ShardDataset(shards)
    trained_on = lambda name: any(f"_{name}_" in key for key in dataset.keys)  # noqa: E731  <set>_<video>_<clip>
    checker = sorted(p.stem for p in (synth_raw / "videos" / "checker").glob("*.mp4"))
    assert all(map(trained_on, [video.stem, *checker, "synth01", f"checker-{checker[0]}"]))  # each input
    assert not trained_on("synth00")
    davis_part = next(p for p in parts if p["kind"] == "frames")
    assert davis_part["samples"] == 2 and davis_part["format"] == "jpeg"   # 32 frames: two 12-frame clips, no masks
    assert all("m000.png" not in dataset.members(i) for i in range(len(dataset)))
    assert [s.name for s in open_sequences(davis)] == ["synth00"]
    packed = {m: m.stat().st_mtime_ns for m in (tmp_path / "data" / "shards" / "parts").glob("*/manifest.json")}
    prepare_real_data(train, scored, tmp_path, data)      # a rerun reuses what was packed
    assert packed == {m: m.stat().st_mtime_ns for m in (tmp_path / "data" / "shards" / "parts").glob("*/manifest.json")}


def test_a_network_is_scored_once_per_content_and_setting(tmp_path, davis_dir, monkeypatch):
    """The rows share one record per network content: a copy of scored weights (TimeT's start is the DINO
    row's backbone) reuses the score and gets the masks; changed weights are scored again."""
    calls = []

    def fake_scoring(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "mask.png").write_bytes(argv[2].encode())
        return {"scores": {"J&F-Mean": len(calls) / 10, "J-Mean": 0.0, "F-Mean": 0.0}}
    monkeypatch.setattr(learning.eval_run, "main", fake_scoring)
    setting, scored = learning.Setting(1, (), "dino", 96), tmp_path / "scores"
    dino, timet_start, other = tmp_path / "dino.safetensors", tmp_path / "start.safetensors", tmp_path / "b.safetensors"
    weights = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    save_file(weights, str(dino), metadata={"format": "densevid-backbone-v1", "arch": "vit_tiny_patch8"})
    save_file(dict(reversed(weights.items())), str(timet_start),    # the same content, written by another process
              metadata={"arch": "vit_tiny_patch8", "format": "densevid-backbone-v1"})
    save_file({**weights, "b": torch.zeros(3, dtype=torch.bfloat16)}, str(other), metadata={"arch": "vit_tiny_patch8"})

    def score(weights, out):
        return learning.label_propagation(["--ckpt", str(weights)], davis_dir, setting, tmp_path / out, scored)
    first = score(dino, "dino")
    reused = score(timet_start, "timet")
    assert len(calls) == 1 and reused["J&F"] == first["J&F"] and str(timet_start) in reused["argv"]
    assert (tmp_path / "timet" / "mask.png").read_bytes() == str(dino).encode()    # the scored masks, copied
    assert score(other, "other")["J&F"] != first["J&F"] and len(calls) == 2
    save_file({**weights, "w": weights["w"] + 1}, str(dino))                      # same path, new content
    assert score(dino, "dino-again")["J&F"] != first["J&F"] and len(calls) == 3


def test_scores_are_reused_until_the_weights_or_the_sequences_change(tmp_path, davis_dir, monkeypatch):
    setting = learning.Setting(1, (), "dino", 96)
    first = learning.label_propagation(["--features", "pixels"], davis_dir, setting, tmp_path / "pixels")

    def no_scoring(argv):
        raise AssertionError("scored again")
    monkeypatch.setattr(learning.eval_run, "main", no_scoring)
    assert learning.label_propagation(["--features", "pixels"], davis_dir, setting, tmp_path / "pixels") == first
    one = link_sequences(parse_eval_input(f"{davis_dir}:synth00"), tmp_path / "one")
    with pytest.raises(AssertionError, match="scored again"):   # another scored selection
        learning.label_propagation(["--features", "pixels"], one, setting, tmp_path / "pixels")
    with pytest.raises(AssertionError, match="scored again"):   # another short side
        learning.label_propagation(["--features", "pixels"], davis_dir, learning.Setting(1, (), "dino", 64),
                                   tmp_path / "pixels")


def test_a_rerun_reports_the_training_it_reuses_not_its_own_seconds(tmp_path, monkeypatch):
    """train() keeps the times of the calls that trained steps: a rerun of a finished run reports them, and
    a run trained outside the benchmark reports none ("—" in the table) instead of a rerun's few seconds."""
    steps_to_log = []

    def fake_run_py(command, **_):
        run_dir = Path(command[command.index("--out") + 1])
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "log.jsonl", "a") as log:
            for step in steps_to_log:
                log.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    monkeypatch.setattr(learning.subprocess, "run", fake_run_py)
    setting = learning.Setting(10, (), "dino", 96)

    def train(run_dir, steps):
        steps_to_log[:] = steps
        return learning.train("dino", setting, "cpu", tmp_path / "shards", tmp_path / run_dir)
    first = train("run", [5, 10])
    assert first["wall_s"] > 0 and first["cpu_s"] >= 0 and [r["step"] for r in first["log"]] == [5, 10]
    again = train("run", [])
    assert (again["wall_s"], again["cpu_s"]) == (first["wall_s"], first["cpu_s"])
    (tmp_path / "by-hand").mkdir()
    (tmp_path / "by-hand" / "log.jsonl").write_text(json.dumps({"step": 10, "loss": 0.1}) + "\n")
    by_hand = train("by-hand", [])
    assert by_hand["wall_s"] is None and by_hand["cpu_s"] is None
    row = {"method": "dino", "start_from": None, "steps": 10, "wall_s": None, "cpu_s": None, "loss_first": 1.0,
           "loss_last": 0.1, "gain_over_init": 0.0, "gain_over_pixels": 0.0,
           "scores": {k: {"J&F": 0.5, "J": 0.5, "F": 0.5} for k in ("trained", "init", "pixels")}}
    assert "| dino | 10 | — | 1.000 → 0.100 |" in learning.markdown_table([row])
