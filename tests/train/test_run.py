"""train/run.py end to end on synthetic shards: both methods, resume, SIGTERM, NaN guard, 2 ranks."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models.io
from pipeline import build_loader
from train import run
from train.config import load_config
from train.gpu_report import DRY_RUN_OVERRIDES
from train.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--cpu", "--data.batch_size", "2", "--data.num_workers", "0", "--run.log_every", "1"]
TINY = DRY_RUN_OVERRIDES  # per method: the smallest settings that still exercise it
# Per method: logged keys that must be there, and the checkpoint prefix of the exported backbone.
LOGGED = {
    "crw": ({"xent_k1", "xent_k2", "acc_k1", "node_std", "lr"}, "encoder."),
    "dino": ({"teacher_entropy", "feature_std", "momentum", "teacher_temp", "wd"}, "teacher."),
    "timet": ({"label_clusters", "target_accuracy", "source_confidence", "momentum", "lr", "backbone_lr"},
              "student."),
    "selfpatch": ({"cls_loss", "patch_loss", "teacher_patch_entropy", "momentum", "teacher_temp"}, "teacher."),
    "dora": ({"teacher_entropy", "feature_std", "momentum", "teacher_temp", "wd", "mask_fraction"}, "teacher."),
    "smtc": ({"diversity", "consistency", "instance", "valid_fraction", "backbone_lr"}, "student.encoder."),
    "neco": ({"teacher_rank_entropy", "feature_std", "momentum", "backbone_lr"}, "student."),
}
HEADS = {"smtc": ["slots.safetensors"]}
SAVED = {"crw": ("patch_size", 16), "dino": ("out_dim", 64), "timet": ("num_prototypes", 8),
         "selfpatch": ("patch_out_dim", 32), "dora": ("out_dim", 64),
         "smtc": ("num_slots", 4), "neco": ("roi_size", 2)}


def argv(method, data, out, steps, *extra):
    return ["--method", method, "--data", str(data), "--out", str(out), "--steps", str(steps),
            *COMMON, *TINY[method], *extra]


def same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_two_steps_write_the_run_directory(method, jpeg_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run.main(argv(method, jpeg_shards, out, 2, "--report")) == 0
    # stderr is not a terminal under pytest: no progress bar, so each logged step prints a line instead
    printed = capsys.readouterr().out
    assert "step 1/2 | loss " in printed and "step 2/2 | loss " in printed
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert torch.isfinite(torch.tensor(r["loss"])) and r["samples_per_s"] > 0 and 0 <= r["data_wait_pct"] <= 100
    logged, prefix = LOGGED[method]
    assert logged <= set(records[0])
    assert method != "dora" or 0 < records[0]["mask_fraction"] < 1
    saved = load_config(method, str(out / "config.yaml"))
    assert (saved.run.steps, saved.data.batch_size, saved.data.path) == (2, 2, str(jpeg_shards))
    field, value = SAVED[method]  # a --<method>.<key> option of TINY reached config.yaml
    assert getattr(saved.objective, field) == value
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and "git" in versions
    assert list((out / "tb").glob("events.out.tfevents.*"))
    state = torch.load(out / "checkpoints/step-000002/trainer-rank0.pt", weights_only=False)
    assert state["step"] == 2 and state["loader"]["position"] == 4
    report = json.loads((out / "throughput.json").read_text())
    assert report["samples_per_s"] > 0 and report["tflops_per_step_per_rank"] > 0 and report["peak_memory_gib"] > 0
    # The exported backbone is what eval loads: the teacher for DINO and SelfPatch, the student for TimeT, the encoder for CRW.
    backbone = models.io.load_backbone(out / "backbone.safetensors")
    trained = load_file(str(out / "checkpoints/step-000002/model.safetensors"))
    exported = {k: v for k, v in trained.items() if k.startswith(prefix)}
    assert len(exported) == len(backbone.state_dict())
    for value in backbone.state_dict().values():
        assert any(torch.equal(value, e) for e in exported.values() if e.shape == value.shape)
    # Every checkpoint keeps its own backbone, and the step-0 network is exported for comparison.
    same_tensors(out / "checkpoints/step-000002/backbone.safetensors", out / "backbone.safetensors")
    # Heads evaluation reads (Objective.export_heads) sit beside every exported backbone: SMTC's slots.
    for folder in (out, out / "checkpoints/step-000002", out / "init"):
        heads = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in ("backbone.safetensors",
                                                                                     "model.safetensors"))
        assert heads == HEADS.get(method, []), folder
    init = load_file(str(out / "init" / "backbone.safetensors"))
    assert init.keys() == load_file(str(out / "backbone.safetensors")).keys()
    assert any(not torch.equal(v, load_file(str(out / "backbone.safetensors"))[k]) for k, v in init.items())


@pytest.mark.parametrize("method,shards,extra", [
    ("dino", "jpeg_shards", ()), ("dino", "jpeg_shards", ("--dino.centering", "sinkhorn")),
    ("selfpatch", "jpeg_shards", ()),
    ("timet", "jpeg_shards", ("--timet.queue_size", "64")),
    ("dora", "long_shards", ()),
    # SMTC: the backbone's LR is 0 for the first 3 steps (grad_iter), so the resume crosses the switch
    ("smtc", "jpeg_shards", ("--optim.backbone_frozen_steps", "3", "--optim.warmup_epochs", "0")),
    # NeCo: its queue (filled from step 1) and the teacher replay; the references are drawn with torch's RNG
    ("neco", "jpeg_shards", ("--neco.queue_size", "64")),
])
def test_resumed_from_a_checkpoint_equals_uninterrupted(method, shards, extra, request, tmp_path):
    """4 steps straight vs 2 steps + resume: bit-identical weights, optimiser state and EMA teacher
    (SelfPatch: and its patch center; TimeT: and its queue, which fills during step 4, and its frozen blocks;
    DoRA: on `--kind long` shards of one synthetic long video; its random heads replay too)."""
    data = request.getfixturevalue(shards)
    straight = tmp_path / "straight"
    assert run.main(argv(method, data, straight, 4, "--run.ckpt_every", "2", *extra)) == 0
    resumed = tmp_path / "resumed"
    half = straight / "checkpoints/step-000002"
    assert run.main(argv(method, data, resumed, 4, "--resume", str(half), *extra)) == 0
    same_tensors(straight / "checkpoints/step-000004/model.safetensors",
                 resumed / "checkpoints/step-000004/model.safetensors")
    same_tensors(straight / "backbone.safetensors", resumed / "backbone.safetensors")
    opt_a = torch.load(straight / "checkpoints/step-000004/optimizer.bin", weights_only=False)["state"]
    opt_b = torch.load(resumed / "checkpoints/step-000004/optimizer.bin", weights_only=False)["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 4]
    if method == "smtc":
        assert [r["backbone_lr"] > 0 for r in log] == [False, True]


def wait_for(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_crw_sigterm_then_resume_auto_equals_uninterrupted(jpeg_shards, tmp_path):
    steps, one_clip = 6, ["--data.batch_size", "1"]
    straight = tmp_path / "straight"
    assert run.main(argv("crw", jpeg_shards, straight, steps, *one_clip)) == 0

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "train/run.py", *argv("crw", jpeg_shards, interrupted, steps, *one_clip)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = interrupted / "log.jsonl"
    started = wait_for(lambda: log.is_file() and log.read_text().strip(), 240, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert started and proc.returncode == run.EXIT_INTERRUPTED, output  # a scheduler requeues on 75
    assert "stopped by SIGTERM" in output
    (stopped_at,) = [p.name for p in (interrupted / "checkpoints").iterdir()]
    assert stopped_at < f"step-{steps:06d}", "the signal arrived after the run ended"

    assert run.main(argv("crw", jpeg_shards, interrupted, steps, *one_clip, "--resume", "auto")) == 0
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # every step exactly once across the two sessions
    same_tensors(straight / f"checkpoints/step-{steps:06d}/model.safetensors",
                 interrupted / f"checkpoints/step-{steps:06d}/model.safetensors")


@pytest.mark.parametrize("backend", ["cpu", pytest.param("dali", marks=pytest.mark.dali)])
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_checkpoints(backend, jpeg_shards, tmp_path):
    """Schedulers (SLURM pre-emption, `timeout`, Kubernetes) signal every process of the job: loader
    workers must leave the stop to the trainer instead of dying and aborting the step in flight."""
    out = tmp_path / "run"
    command = argv("crw", jpeg_shards, out, 1000, "--data.num_workers", "1", "--data.backend", backend)
    proc = subprocess.Popen([sys.executable, "train/run.py", *command], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = out / "log.jsonl"
    started = wait_for(lambda: log.is_file() and log.read_text().strip(), 240, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert started and proc.returncode == run.EXIT_INTERRUPTED, output
    assert "stopped by SIGTERM" in output
    assert list((out / "checkpoints").iterdir()) and (out / "backbone.safetensors").is_file()


def test_half_precision_views_without_autocast_fail_fast(jpeg_shards, tmp_path):
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="data.dtype bfloat16 needs bf16 autocast"):
        run.main(argv("crw", jpeg_shards, tmp_path / "run", 2, "--data.dtype", "bfloat16"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_nan_guard_stops_dumps_the_batch_and_keeps_the_last_good_checkpoint(jpeg_shards, tmp_path, monkeypatch,
                                                                            capsys):
    crw = OBJECTIVES["crw"]
    calls = []
    original = crw.forward

    def poisoned(self, batch):
        loss, logs = original(self, batch)
        if len(batch["patches"]) > 1:  # training steps, not the one-sample CPU memory probe
            calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), logs

    monkeypatch.setattr(crw, "forward", poisoned)
    out = tmp_path / "run"
    assert run.main(argv("crw", jpeg_shards, out, 6, "--run.ckpt_every", "1")) == run.EXIT_NONFINITE
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    dump = torch.load(out / "nonfinite-step-000002-rank0.pt", weights_only=False)
    assert dump["batch"]["patches"].shape == (2, 3, 9, 3, 16, 16)
    assert dump["logs"]["loss"] != dump["logs"]["loss"]  # NaN
    assert "non-finite loss or gradient at step 2" in capsys.readouterr().err


def two_gloo_ranks(method, data, out, port, *extra):
    """2 steps of `method` under `torchrun --nproc_per_node 2` on the CPU; (output, per-rank trainer states)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "train/run.py", *argv(method, data, out, 2, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = out / "checkpoints/step-000002"
    return proc.stdout + proc.stderr, [torch.load(ckpt / f"trainer-rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_two_process_gloo_crw_run_keeps_batchnorm_stats_identical(jpeg_shards, tmp_path):
    # ResNet-18's BatchNorm running statistics are updated by each rank's own batch; the checkpoint
    # must hold rank 0's on every rank (it used to stop with "the ranks' weights differ").
    _, states = two_gloo_ranks("crw", jpeg_shards, tmp_path / "ddp-crw", 29518)
    assert states[0]["weights_sha256"] == states[1]["weights_sha256"]


def test_two_process_gloo_run_reads_disjoint_data_and_keeps_ranks_identical(jpeg_shards, tmp_path):
    out = tmp_path / "ddp"
    output, states = two_gloo_ranks("dino", jpeg_shards, out, 29517)
    assert "2 process(es)" in output
    # save_checkpoint already refuses to write when the ranks' weights differ; check its record too.
    assert states[0]["weights_sha256"] == states[1]["weights_sha256"]
    assert [(s["loader"]["rank"], s["loader"]["world_size"], s["loader"]["position"]) for s in states] == [
        (0, 2, 4), (1, 2, 4)]
    # The first batch each rank trained on (one epoch is 3 samples per rank), replayed from the saved
    # configuration: the ranks read disjoint samples.
    cfg = load_config("dino", str(out / "config.yaml"))
    views = OBJECTIVES["dino"](cfg.objective, arch=cfg.model.arch, total_steps=2, steps_per_epoch=1).views()
    cfg.data.device = "cpu"
    first = [{int(i) for i in next(iter(build_loader(cfg.data, views, r, 2)))["sample"]} for r in (0, 1)]
    assert len(first[0]) == len(first[1]) == 2 and first[0].isdisjoint(first[1])


def test_two_process_gloo_run_with_frozen_blocks_and_a_frozen_first_step(jpeg_shards, tmp_path):
    # Parameters without requires_grad stay out of DDP's reducer; a backbone at LR 0 still syncs gradients.
    out = tmp_path / "ddp-frozen"
    _, states = two_gloo_ranks("dino", jpeg_shards, out, 29519, "--model.trainable", "blocks.10,blocks.11",
                               "--optim.backbone_frozen_steps", "1", "--optim.warmup_epochs", "0")
    assert states[0]["weights_sha256"] == states[1]["weights_sha256"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["backbone_lr"] == 0 and log[1]["backbone_lr"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dino", "timet"])
def test_on_gpu_runs_in_bf16_and_reports_memory(method, jpeg_shards, tmp_path):
    out = tmp_path / "gpu"
    args = [a for a in argv(method, jpeg_shards, out, 3, "--report") if a != "--cpu"]
    assert run.main(args) == 0
    report = json.loads((out / "throughput.json").read_text())
    assert report["device"].startswith("cuda") and report["peak_memory_gib"] > 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_gradient_accumulation_matches_the_larger_batch(jpeg_shards, tmp_path, monkeypatch):
    """2 micro-batches of 1 clip == 1 batch of 2 clips (ViT encoder: no batch statistics; no dropout).

    The gradients the optimiser receives are compared, not the updated weights: Adam's first step is
    ~lr * sign(grad), so a weight whose gradient is ~0 moves a whole step either way on rounding noise,
    which differs between processors."""
    seen: list[list[torch.Tensor]] = []
    adam_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    common = ["--model.arch", "vit_tiny_patch16", "--crw.edge_dropout", "0"]
    assert run.main(argv("crw", jpeg_shards, tmp_path / "big", 1, *common)) == 0
    assert run.main(argv("crw", jpeg_shards, tmp_path / "acc", 1, *common, "--data.batch_size", "1",
                         "--optim.accum_steps", "2")) == 0
    big, acc = seen
    assert len(big) == len(acc) > 0
    for g_big, g_acc in zip(big, acc):
        # Summation order differs (one batch vs two halves): float32 rounding relative to the tensor's scale.
        torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-5 * float(g_big.abs().max()) + 1e-12)
    acc_log, big_log = (json.loads((tmp_path / name / "log.jsonl").read_text()) for name in ("acc", "big"))
    assert acc_log["loss"] == pytest.approx(big_log["loss"], rel=1e-5)
    assert acc_log["grad_norm"] == pytest.approx(big_log["grad_norm"], rel=1e-4)  # averaged, not summed


def test_a_new_run_in_a_folder_holding_a_run_is_refused_until_resume_or_overwrite(jpeg_shards, tmp_path):
    out = tmp_path / "run"
    assert run.main(argv("crw", jpeg_shards, out, 2)) == 0
    first = load_file(str(out / "checkpoints/step-000002/model.safetensors"))
    with pytest.raises(run.RunDirError, match=r"already holds 1 checkpoint\(s\), latest step-000002: continue "
                                              r"that run with --resume auto, replace it with --overwrite"):
        run.main(argv("crw", jpeg_shards, out, 3))
    with pytest.raises(run.RunDirError, match="give one"):
        run.main(argv("crw", jpeg_shards, out, 3, "--overwrite", "--resume", "auto"))
    (out / "eval").mkdir()
    (out / "notes.txt").write_text("mine")
    # --overwrite replaces the old run: its checkpoints, log and eval results are gone, not mixed in.
    assert run.main(argv("crw", jpeg_shards, out, 1, "--overwrite", "--run.seed", "5")) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    assert not (out / "eval").exists() and (out / "notes.txt").read_text() == "mine"
    # ... so --resume auto now continues the new run (seed 5), not the old one.
    assert run.main(argv("crw", jpeg_shards, out, 2, "--resume", "auto", "--run.seed", "5")) == 0
    second = load_file(str(out / "checkpoints/step-000002/model.safetensors"))
    assert not all(torch.equal(first[k], second[k]) for k in first)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_cpu_step_that_would_not_fit_in_memory_stops_first_naming_a_batch_that_fits(jpeg_shards, tmp_path,
                                                                                       monkeypatch):
    from train import telemetry

    per_sample, fixed = {}, {}
    measure = telemetry.step_memory_bytes

    def measured(*args):
        per_sample["bytes"], fixed["bytes"] = measure(*args)
        return per_sample["bytes"], fixed["bytes"]

    monkeypatch.setattr(telemetry, "step_memory_bytes", measured)
    monkeypatch.setattr(telemetry, "available_memory_bytes", lambda: 10**12)
    assert run.main(argv("crw", jpeg_shards, tmp_path / "fits", 1, "--data.batch_size", "4")) == 0
    assert per_sample["bytes"] > 0 and fixed["bytes"] > 0
    # Free memory for the fixed part and 2.5 samples (at 80 % use): a batch of 4 does not fit, 2 does.
    free = (fixed["bytes"] + 2.5 * per_sample["bytes"]) / 0.8
    monkeypatch.setattr(telemetry, "available_memory_bytes", lambda: int(free))
    out = tmp_path / "run"
    with pytest.raises(run.ConfigError, match=r"--cpu: one step at data.batch_size 4 needs about .* GiB per sample, "
                                              r"measured\), .* free: use --data.batch_size 2 \(with "
                                              r"--optim.accum_steps 2 for the same global batch\)"):
        run.main(argv("crw", jpeg_shards, out, 1, "--data.batch_size", "4"))
    assert not out.exists()
    assert run.main(argv("crw", jpeg_shards, out, 1, "--data.batch_size", "2", "--optim.accum_steps", "2")) == 0


def test_timet_trains_two_steps_from_an_official_dinov2_checkpoint(jpeg_shards, tmp_path, capsys):
    from tests.models.dinov2_checkpoints import official_dinov2_state

    init = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official_dinov2_state("small", 4), init)
    out = tmp_path / "run"
    # 42 px: 3 x 3 patches of 14; blocks 10-11 of the 12 train (timet.yaml's model.trainable)
    assert run.main(argv("timet", jpeg_shards, out, 2, "--model.arch", "vit_small_patch14_reg4_dinov2",
                         "--model.init", str(init), "--timet.size", "42")) == 0
    assert f"backbone from {init}" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    exported = models.io.load_backbone(out / "backbone.safetensors")
    assert exported.num_prefix_tokens == 5  # CLS + 4 registers survive the export


@pytest.mark.slow
@pytest.mark.parametrize("arch,official", [("vit_small_patch14_reg4_dinov2", "dinov2_reg4"),
                                           ("vit_small_patch16", "dino")])
def test_neco_trains_two_steps_from_an_official_checkpoint(arch, official, jpeg_shards, tmp_path, capsys):
    """--model.init from an official-layout DINOv2 ViT-S/14-reg4 and a DINO ViT-S/16 file (random weights)."""
    if official == "dino":
        from tests.train.test_finetune import pretrained  # dino_deitsmall16_pretrain.pth's layout

        state, sizes = pretrained("vit_small_patch16"), ["--neco.global_size", "32", "--neco.local_size", "16"]
    else:
        from tests.models.dinov2_checkpoints import official_dinov2_state

        state, sizes = official_dinov2_state("small", 4), ["--neco.global_size", "28", "--neco.local_size", "14"]
    init = tmp_path / f"{official}.pth"
    torch.save(state, init)
    out = tmp_path / "run"
    assert run.main(argv("neco", jpeg_shards, out, 2, "--model.arch", arch, "--model.init", str(init), *sizes)) == 0
    assert f"backbone from {init}" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    exported = models.io.load_backbone(out / "backbone.safetensors")
    assert exported.num_prefix_tokens == (5 if official == "dinov2_reg4" else 1)
    loaded = models.io.load_backbone(out / "init" / "backbone.safetensors").state_dict()
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"].float(), state["blocks.0.attn.qkv.weight"].float())
