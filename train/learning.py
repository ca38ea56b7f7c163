"""Learning benchmark: does training with densevid make dense features better than before training?

    python -m train.learning --methods crw dino --budget cpu --out DIR     (minutes on a CPU)
    python -m train.learning --methods crw dino --budget gpu --out DIR     (minutes on one GPU)
    python -m train.learning --methods crw dino --budget cpu --out DIR \
        --train-data videos/ DAVIS:bmx-trees,camel --eval-data DAVIS:blackswan,libby     (real video)

Without --train-data it writes a synthetic training set and held-out DAVIS-layout sequences
rendered with another seed (shard_tools/synth.py); with --train-data and --eval-data it packs the
real inputs that are not packed yet and scores the chosen DAVIS sequences (train/real_data.py:
video files, folders of videos, DAVIS-layout folders, packed datasets; PATH:NAME,... chooses
sequences; a sequence both trained on and scored is refused). It trains every method through
train/run.py with the budget's settings (SETTINGS below: a row per budget, and a "-real" row for
real frames), then scores label propagation on the held-out sequences for (a) the trained backbone,
(b) the same network at its initialisation (the run's init/backbone.safetensors: same seed, 0
steps) and (c) raw pixels. It prints and writes DIR/learning.json and DIR/learning.md. Rerunning
reuses the data and continues finished runs.

Adding a method is one entry per budget in SETTINGS.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from eval import run as eval_run
from eval.davis_io import open_sequences
from eval.propagation_config import PRESETS
from models.io import read_checkpoint
from shard_tools.manifest import load_manifest
from shard_tools.synth import make_dataset
from shard_tools.writer import sha256_file
from train.checkpoint import tensors_digest
from train.real_data import (Input, InputError, RealData, check_no_overlap, parse_eval_input, parse_input,
                             prepare_real_data)
from train.rundir import read_log

REPO_ROOT = Path(__file__).resolve().parent.parent
BUDGETS = ("cpu", "gpu")


@dataclass(frozen=True)
class Data:
    """The synthetic data of a budget (shard_tools/synth.py arguments)."""

    train_videos: int
    eval_sequences: int
    frames: int
    width: int
    height: int
    train_seed: int = 0
    eval_seed: int = 1          # held out: rendered from other random draws than any training video


@dataclass(frozen=True)
class Setting:
    """How one method trains and is evaluated within a budget."""

    steps: int
    train_args: tuple[str, ...]   # train/run.py flags (config overrides)
    protocol: str                 # eval/run.py labelprop --protocol
    short_side: int               # frames resized to this short side for propagation (0: native)
    start_from: str | None = None  # a method of SETTINGS whose trained backbone (same budget) is --model.init


DATA = {
    "cpu": Data(train_videos=48, eval_sequences=4, frames=32, width=128, height=96),
    "gpu": Data(train_videos=256, eval_sequences=8, frames=48, width=256, height=192),
}
# Real inputs (--train-data) are packed at this short side, in 1-s samples on the CPU (6 DAVIS
# sequences and 3 short videos make 36 samples: an epoch of 4 steps at batch 8, as the 48 synthetic
# videos give 6). The cpu-real rows propagate at short side 320, where raw pixels score 0.50 on real
# DAVIS sequences against 0.31 at 192 (docs/learning.md section 11).
REAL_DATA = {
    "cpu": RealData(short_side=160, clip_seconds=1),
    "gpu": RealData(short_side=256, clip_seconds=2),
}

# The 128x96 CPU frames are propagated at short side 192 (a 32x24 grid of stride-8 cells); the CRW
# CPU run cuts 32-px patches from 96-px crops. The CPU ViT rows share one ViT-Ti/16 recipe: batch 8,
# peak LR 5e-4 without linear batch scaling (which gives 1.6e-5 at batch 8), 1-epoch warm-up, 64-px
# global and 2 x 32-px local crops, small heads. TimeT and SMTC fine-tune the DINO row's network, as
# the papers fine-tune DINO. docs/learning.md has the measurements behind each row.
VIT_TINY_CPU = ("--model.arch", "vit_tiny_patch16", "--model.drop_path", "0", "--data.batch_size", "8",
                "--optim.lr_scaling", "none", "--optim.lr", "5e-4", "--optim.warmup_epochs", "1")


def small_crops_and_head(section: str) -> tuple[str, ...]:
    """The CPU rows' multi-crop and projection head for a DINO-family objective's config section."""
    return (f"--{section}.global_size", "64", f"--{section}.local_size", "32", f"--{section}.local_crops", "2",
            f"--{section}.out_dim", "256", f"--{section}.head_hidden_dim", "64",
            f"--{section}.head_bottleneck_dim", "32")


# NeCo post-trains the DINO row's network (the reference post-trains DINO with neco_dino.yml): 64-px globals
# (4 x 4 patches) and 2 x 32-px locals, 4 x 4 aligned patches per pair; the head at 1e-4 and, so that 60 steps
# move it, the backbone too (the reference's x0.1 is for 25 epochs).
NECO_CPU = ("--model.arch", "vit_tiny_patch16", "--model.drop_path", "0", "--data.batch_size", "8",
            "--neco.global_size", "64", "--neco.local_size", "32", "--neco.local_crops", "2",
            "--neco.roi_size", "4", "--neco.proj_hidden_dim", "256", "--optim.lr", "1e-4",
            "--optim.backbone_lr_mult", "1")

SETTINGS: dict[str, dict[str, Setting]] = {
    "crw": {
        "cpu": Setting(60, ("--model.arch", "resnet18_crw_w16", "--data.batch_size", "8", "--crw.size", "96",
                             "--crw.patch_size", "32", "--crw.patch_stride", "16", "--crw.frame_stride", "2",
                             "--optim.lr", "1e-3", "--optim.min_lr", "1e-4"), "crw", 192),
        "gpu": Setting(3000, ("--data.batch_size", "20", "--crw.size", "256", "--crw.frame_stride", "2"),
                       "crw", 480),
    },
    "dino": {
        "cpu": Setting(400, (*VIT_TINY_CPU, *small_crops_and_head("dino")), "dino", 192),
        "gpu": Setting(3000, ("--data.batch_size", "64", "--dino.local_crops", "6", "--dino.out_dim", "4096"),
                       "dino", 480),
    },
    "selfpatch": {
        "cpu": Setting(400, (*VIT_TINY_CPU, *small_crops_and_head("selfpatch"), "--selfpatch.patch_out_dim", "256"),
                       "dino", 192),
        "gpu": Setting(3000, ("--data.batch_size", "64", "--selfpatch.local_crops", "6",
                              "--selfpatch.out_dim", "4096", "--selfpatch.patch_out_dim", "1024"), "dino", 480),
    },
    "dora": {
        # 4 frames 4 packed frames apart (the 32-frame videos hold no 8 x 20); the epoch-denominated
        # settings of dora.yaml are for 60 s segments and are reset to the DINO row's.
        "cpu": Setting(200, (*VIT_TINY_CPU, *small_crops_and_head("dora"), "--dora.frames", "4",
                             "--dora.frame_stride", "4", "--dora.freeze_last_layer_epochs", "1",
                             "--dora.warmup_teacher_temp_epochs", "0"), "dino", 192),
        "gpu": Setting(3000, ("--data.batch_size", "8", "--dora.frame_stride", "4", "--dora.out_dim", "4096",
                              "--optim.lr_scaling", "none", "--optim.lr", "1.25e-4",   # the DINO row's peak
                              "--optim.warmup_epochs", "10", "--dora.freeze_last_layer_epochs", "1",
                              "--dora.warmup_teacher_temp_epochs", "0"), "dino", 480),
    },
    "timet": {
        "cpu": Setting(100, ("--model.arch", "vit_tiny_patch16", "--data.batch_size", "8", "--timet.size", "96",
                             "--timet.frame_stride", "4", "--timet.num_prototypes", "32", "--optim.lr", "1e-3"),
                       "dino", 192, start_from="dino"),
        "gpu": Setting(1000, ("--data.batch_size", "32", "--timet.frame_stride", "8"), "dino", 480,
                       start_from="dino"),
    },
    "smtc": {
        # The encoder trains at the head's LR from step 0: smtc.yaml's 3000 frozen steps and x0.01
        # afterwards are for 10k steps; in 60 they leave the encoder where DINO left it (+0.005 J&F).
        "cpu": Setting(60, ("--model.arch", "vit_tiny_patch16", "--model.drop_path", "0", "--data.batch_size", "4",
                            "--smtc.size", "64", "--optim.lr", "1e-4", "--optim.lr_scaling", "none",
                            "--optim.backbone_frozen_steps", "0", "--optim.backbone_lr_mult", "1"),
                       "smtc", 192, start_from="dino"),
        "gpu": Setting(1000, ("--data.batch_size", "16", "--optim.lr_scaling", "none", "--optim.lr", "1e-4",
                              "--optim.backbone_frozen_steps", "0", "--optim.backbone_lr_mult", "1"), "smtc", 480,
                       start_from="dino"),
    },
    "neco": {
        "cpu": Setting(60, NECO_CPU, "dino", 192, start_from="dino"),
        # neco.yaml's batch 6; the DINO row's ViT-S/16 takes 96-px locals (whole patches), the backbone at
        # the reference's neco_dino.yml 1e-5
        "gpu": Setting(1000, ("--model.arch", "vit_small_patch16", "--neco.local_size", "96",
                              "--optim.backbone_lr_mult", "0.1"), "dino", 480, start_from="dino"),
    },
}
# The GPU budget's real-data rows are its synthetic rows: paper-size recipes, set by the papers for
# real video, here trained on --train-data and scored at 480p.
# The CPU budget's real-data rows are its synthetic rows with two changes measured on real DAVIS
# (docs/learning.md section 11): ViT-Ti/8 instead of /16, and propagation at short side 320. At 320 a
# stride-16 grid (20 x 35) is what limits a ViT: a random ViT-Ti/16 scores 0.240 there and no DINO variant
# tried moved it (0.220-0.243), while a random ViT-Ti/8 (40 x 71, the pixel baseline's grid) scores 0.508,
# level with raw pixels. DINO trains 200 steps: 36 real samples make 50 epochs of them.
REAL_CPU_STEPS = {"dino": 200}
for _method, _rows in SETTINGS.items():
    _rows["gpu-real"] = _rows["gpu"]
    _cpu = _rows["cpu"]
    _rows["cpu-real"] = replace(
        _cpu, steps=REAL_CPU_STEPS.get(_method, _cpu.steps), short_side=320,
        train_args=tuple("vit_tiny_patch8" if arg == "vit_tiny_patch16" else arg for arg in _cpu.train_args))


def prepare_data(out: Path, data: Data) -> tuple[Path, Path]:
    """Render and pack the training set, render the held-out sequences; reuse what exists."""
    shards, davis = out / "data" / "shards" / "train", out / "data" / "eval" / "davis"
    if not (davis / "ImageSets" / "2017" / "val.txt").is_file():
        make_dataset(out / "data" / "eval", seed=data.eval_seed, videos=0, davis=data.eval_sequences,
                     frames=data.frames, width=data.width, height=data.height)
    if not (shards / "manifest.json").is_file():
        make_dataset(out / "data" / "raw", seed=data.train_seed, videos=data.train_videos, classes=4, davis=0,
                     frames=data.frames, width=data.width, height=data.height)
        subprocess.run([sys.executable, str(REPO_ROOT / "shard_tools" / "pack.py"), "--kind", "videos",
                        "--src", str(out / "data" / "raw" / "videos"), "--out", str(shards), "--fps", "25",
                        "--short-side", str(min(data.width, data.height)), "--shard-size", "2e6", "--quiet"],
                       check=True)
    print(f"data: {load_manifest(shards)['samples']} training videos in {shards}, "
          f"{data.eval_sequences} held-out sequences in {davis}", flush=True)
    return shards, davis


def with_starts(methods: list[str], budget: str) -> list[str]:
    """`methods` in an order where every method comes after the one it starts from (added if missing);
    ``budget`` is a key of the methods' SETTINGS rows ("cpu", "gpu-real", ...)."""
    ordered: list[str] = []

    def visit(method: str) -> None:
        if budget not in SETTINGS[method]:
            raise InputError(f"{method} has no {budget!r} row in train/learning.py SETTINGS")
        start = SETTINGS[method][budget].start_from
        if start is not None:
            visit(start)
        if method not in ordered:
            ordered.append(method)

    for method in methods:
        visit(method)
    return ordered


def train_argv(method: str, setting: Setting, budget: str, shards: Path, run_dir: Path) -> list[str]:
    """train/run.py's arguments for one row; a row that starts from another reads that row's backbone,
    trained beside it in ``run_dir.parent``."""
    start = [] if setting.start_from is None else [
        "--model.init", str(run_dir.parent / setting.start_from / "backbone.safetensors")]
    return ["--method", method, "--data", str(shards), "--out", str(run_dir), "--steps", str(setting.steps),
            "--resume", "auto", "--run.log_every", "5", *(["--cpu"] if budget == "cpu" else []), *start,
            *setting.train_args]


def train(method: str, setting: Setting, budget: str, shards: Path, run_dir: Path) -> dict:
    """Train through train/run.py (its progress lines stream through); return time and loss curve.

    The times are those of the calls that trained steps, summed in ``run_dir``/benchmark-timing.json: a
    rerun that finds the run finished reports the training it reuses, not its own few seconds."""
    command = [sys.executable, str(REPO_ROOT / "train" / "run.py"),
               *train_argv(method, setting, budget, shards, run_dir)]
    print("$ " + " ".join(command), flush=True)
    timing = run_dir / "benchmark-timing.json"
    steps_before = last_step(read_log(run_dir))
    # the times so far; None when steps were trained outside the benchmark (by hand, or before it kept times)
    earlier = (json.loads(timing.read_text()) if timing.is_file()
               else {"wall_s": 0.0, "cpu_s": 0.0} if steps_before == 0 else None)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # progress as it happens
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    records = read_log(run_dir)
    if earlier is not None and last_step(records) > steps_before:
        timing.write_text(json.dumps({
            "wall_s": earlier["wall_s"] + time.perf_counter() - started,
            "cpu_s": earlier["cpu_s"] + (cpu_after.ru_utime + cpu_after.ru_stime)
            - (cpu_before.ru_utime + cpu_before.ru_stime)}) + "\n")
    spent = json.loads(timing.read_text()) if timing.is_file() else {"wall_s": None, "cpu_s": None}  # None: "—"
    return {"command": command, **spent, "log": records}


def last_step(records: list[dict]) -> int:
    """The last step a run's log records (`read_log`), 0 before the first."""
    return records[-1]["step"] if records else 0


def checkpoint_digest(path: Path) -> str:
    """SHA-256 of a checkpoint's content: for safetensors its metadata and tensors, not its bytes, whose
    metadata order changes from one process to the next (the same backbone exported twice)."""
    if path.suffix != ".safetensors":
        return sha256_file(path)
    tensors, metadata = read_checkpoint(path)
    return tensors_digest(sorted(tensors.items()), json.dumps(metadata, sort_keys=True).encode())


def label_propagation(features: list[str], davis: Path, setting: Setting, out: Path,
                      scored: Path | None = None) -> dict:
    """J&F / J / F of eval/run.py labelprop with the method's protocol (``features``: its extra flags),
    masks written to ``out``.

    Scores are kept in ``scored`` (default ``out``), one record per scoring, keyed by the weights' content
    (`checkpoint_digest`, not their path), the arguments, the propagation settings and the scored sequences: a
    rerun, or another row whose network is the same file's content (TimeT's start is the DINO row's trained
    backbone; rows of one architecture and seed share their step 0), reuses the score and copies the
    masks instead of scoring again. Scoring real sequences takes minutes per network on a CPU."""
    argv = ["labelprop", *features, "--data", str(davis), "--protocol", setting.protocol,
            "--short-side", str(setting.short_side), "--out", str(out)]
    weights = Path(features[1]) if features[0] == "--ckpt" else None
    weights = weights / "backbone.safetensors" if weights is not None and weights.is_dir() else weights
    what = ["weights:" + checkpoint_digest(weights), *features[2:]] if weights is not None else features
    key = {"features": what, "davis": str(davis), "protocol": setting.protocol, "short_side": setting.short_side,
           "sequences": [s.name for s in open_sequences(davis)],
           "config": json.loads(json.dumps(asdict(replace(PRESETS[setting.protocol],
                                                          short_side=setting.short_side or None))))}
    scored = scored or out
    record = scored / f"scores-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        if Path(previous["masks"]) != out:
            shutil.copytree(previous["masks"], out, dirs_exist_ok=True)
        print(f"$ python eval/run.py {' '.join(argv)}  (scored before: {record})", flush=True)
        return {**previous["scores"], "argv": argv}
    print("$ python eval/run.py " + " ".join(argv), flush=True)
    scores = eval_run.main(argv)["scores"]
    result = {"J&F": scores["J&F-Mean"], "J": scores["J-Mean"], "F": scores["F-Mean"], "argv": argv}
    scored.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "scores": result, "masks": str(out)}, indent=1) + "\n")
    return result


def benchmark(methods: list[str], budget: str, out: Path, real: tuple[list[Input], Input] | None = None) -> dict:
    """Train and score every method; ``real``: the --train-data inputs and the --eval-data folder."""
    if real is None:
        row_key, (shards, davis) = budget, prepare_data(out, DATA[budget])
    else:
        row_key, (shards, davis) = f"{budget}-real", prepare_real_data(*real, out, REAL_DATA[budget])
    rows, scored = [], out / "eval" / "scores"   # scores shared by the rows: a network is scored once per setting
    for method in with_starts(methods, row_key):
        setting = SETTINGS[method][row_key]
        run_dir = out / "runs" / method
        trained = train(method, setting, budget, shards, run_dir)
        evals = out / "eval" / method
        scores = {"trained": label_propagation(["--ckpt", str(run_dir)], davis, setting, evals / "trained", scored),
                  "init": label_propagation(["--ckpt", str(run_dir / "init" / "backbone.safetensors")],
                                            davis, setting, evals / "init", scored),
                  "pixels": label_propagation(["--features", "pixels"], davis, setting,
                                              out / "eval" / f"pixels-{setting.protocol}-{setting.short_side}", scored)}
        log = trained["log"]
        rows.append({"method": method, "start_from": setting.start_from, "steps": log[-1]["step"], "wall_s": trained["wall_s"],
                     "cpu_s": trained["cpu_s"], "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
                     "scores": scores, "gain_over_init": scores["trained"]["J&F"] - scores["init"]["J&F"],
                     "gain_over_pixels": scores["trained"]["J&F"] - scores["pixels"]["J&F"],
                     "setting": asdict(setting), "train_command": trained["command"], "run_dir": str(run_dir)})
    data = asdict(DATA[budget]) if real is None else {
        **asdict(REAL_DATA[budget]), "train_data": [str(s) for s in real[0]], "eval_data": str(real[1])}
    result = {"budget": row_key, "data": data, "davis": str(davis), "rows": rows}
    (out / "learning.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(rows)
    (out / "learning.md").write_text(f"# Learning benchmark, budget {row_key}\n\n{table}\n")
    print(table, flush=True)
    return result


def markdown_table(rows: list[dict]) -> str:
    """method (and the row it starts from) | steps | wall | loss first -> last | J&F / J / F trained,
    init, pixels | gains."""
    head = ("| method | steps | wall s (CPU s) | train loss first → last | J&F trained | J&F init | J&F pixels "
            "| J trained / init / pixels | F trained / init / pixels | gain vs init | gain vs pixels |\n"
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    lines = [head]
    for r in rows:
        s = r["scores"]
        triple = lambda m: " / ".join(f"{s[k][m]:.3f}" for k in ("trained", "init", "pixels"))  # noqa: E731
        wall = "—" if r["wall_s"] is None else f"{r['wall_s']:.0f} ({r['cpu_s']:.0f})"
        name = r["method"] + (f" (from {r['start_from']})" if r["start_from"] else "")
        lines.append(f"| {name} | {r['steps']} | {wall} | "
                     f"{r['loss_first']:.3f} → {r['loss_last']:.3f} | {s['trained']['J&F']:.3f} | "
                     f"{s['init']['J&F']:.3f} | {s['pixels']['J&F']:.3f} | {triple('J')} | {triple('F')} | "
                     f"{r['gain_over_init']:+.3f} | {r['gain_over_pixels']:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["crw", "dino"], choices=sorted(SETTINGS),
                        help="methods to train and score")
    parser.add_argument("--budget", default="cpu", choices=BUDGETS,
                        help="cpu: small models for a few CPU minutes; gpu: paper-size models, minutes on one GPU")
    parser.add_argument("--out", required=True, help="output folder (data/, runs/, eval/, learning.json|md)")
    parser.add_argument("--train-data", nargs="+", metavar="SRC",
                        help="real training inputs instead of synthetic videos: video files, folders of videos, "
                             "DAVIS-layout folders (frames only; PATH:NAME,... chooses sequences), packed datasets")
    parser.add_argument("--eval-data", metavar="DAVIS_DIR",
                        help="DAVIS-layout folder scored by label propagation (PATH:NAME,... chooses sequences); "
                             "needs --train-data, and none of its sequences may be trained on")
    args = parser.parse_args(argv)
    real = None
    if args.train_data or args.eval_data:
        try:   # every check before anything is written
            if not (args.train_data and args.eval_data):
                raise InputError("--train-data and --eval-data go together (real videos to train on, "
                                 "real sequences to score)")
            real = [parse_input(text) for text in args.train_data], parse_eval_input(args.eval_data)
            check_no_overlap(*real)
            with_starts(args.methods, f"{args.budget}-real")
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return benchmark(args.methods, args.budget, out, real)


if __name__ == "__main__":
    main()
