"""Train a dense self-supervised objective on packed video shards.

One GPU or CPU:       python train/run.py --method crw --data DATA --out runs/crw --steps 20000
One node, 8 GPUs:     accelerate launch --multi_gpu --num_processes 8 train/run.py --method dino ...
                      (or torchrun --nproc_per_node 8 train/run.py ...)
N nodes (each node):  accelerate launch --multi_gpu --num_machines N --machine_rank R \\
                          --main_process_ip HOST0 --main_process_port 29500 --num_processes 8N train/run.py ...
CPU, 2 processes:     torchrun --nproc_per_node 2 train/run.py --cpu ...   (gloo; note that
                      `accelerate launch --cpu --num_processes 2` starts ONE process without a GPU)
Continue a run:       the same command with --resume auto (also after SIGTERM / SIGINT / pre-emption)

Every rank reads a disjoint part of the shards; the global batch is data.batch_size x processes x
optim.accum_steps and the peak LR is scaled to it explicitly (optim.lr_scaling). The run directory
gets config.yaml, versions.json, checkpoints/step-NNNNNN/, backbone.safetensors, tb/, log.jsonl.
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from accelerate import Accelerator, DistributedDataParallelKwargs  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models.io import export_backbone  # noqa: E402
from pipeline import build_loader  # noqa: E402
from shard_tools.manifest import load_manifest  # noqa: E402
from train.checkpoint import GracefulStop, find_resume_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from train.config import Config, ConfigError, add_config_arguments, load_config, overrides_from_args  # noqa: E402
from train.finetune import backbone_lr_mult, prepare_backbone  # noqa: E402
from train.objectives import OBJECTIVES  # noqa: E402
from train.optim import clip_gradients_, cosine_schedule, param_groups, scaled_lr, set_lr_wd  # noqa: E402
from train.threads import choose_cpu_threads  # noqa: E402
from train.telemetry import Telemetry, Throughput, collect_versions, peak_flops, peak_memory_gib  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Settings a resumed run must share with the run it continues (others, e.g. run.steps, may change).
MUST_MATCH = ("method", "model")
EXIT_NONFINITE = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=sorted(OBJECTIVES), help="objective to train")
    parser.add_argument("--data", help="dataset folder from shard_tools/pack.py (same as --data.path)")
    parser.add_argument("--out", required=True, help="run directory (created; reused by --resume auto)")
    parser.add_argument("--steps", type=int, help="optimiser steps of the whole run (same as --run.steps)")
    parser.add_argument("--config", help="YAML file layered over train/configs/<method>.yaml")
    parser.add_argument("--resume", default="none",
                        help="'auto': continue from the run's latest checkpoint if any; a checkpoint "
                             "folder: start from it; 'none' (default): start fresh")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is visible")
    parser.add_argument("--report", action="store_true",
                        help="measure FLOPs on the first step and write throughput.json (samples/s, "
                             "data-wait %%, MFU, peak memory) at the end")
    parser.add_argument("--peak-tflops", type=float,
                        help="device peak for MFU in TFLOP/s (default: known bf16 peak of the GPU)")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = overrides_from_args(args, args.method)
    if args.data:
        overrides["data.path"] = args.data
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    return load_config(args.method, args.config, overrides)


def check_resumable(run_dir: Path, cfg: Config) -> None:
    """Refuse to continue a run whose method or model differ from the configuration given now."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    saved, now = yaml.safe_load(saved_file.read_text()), cfg.to_dict()
    for key in (*MUST_MATCH, cfg.method):
        if saved.get(key) != now.get(key):
            raise ConfigError(f"{saved_file}: '{key}' was {saved.get(key)!r}, now {now.get(key)!r}; "
                              "a resumed run must keep it, or use a new --out")


def dump_nonfinite_batch(run_dir: Path, rank: int, step: int, batch: dict, logs: dict) -> Path:
    path = run_dir / f"nonfinite-step-{step:06d}-rank{rank}.pt"
    torch.save({"step": step, "batch": {k: v.cpu() for k, v in batch.items()},
                "logs": {k: float(v) for k, v in logs.items()}}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    use_bf16 = cfg.run.precision == "bf16" and torch.cuda.is_available() and not args.cpu
    if cfg.data.dtype != "float32" and not use_bf16:
        # Half-precision views meet float32 weights at the first layer unless autocast casts them.
        raise ConfigError(f"data.dtype {cfg.data.dtype} needs bf16 autocast (run.precision bf16 on a GPU); "
                          "this run computes in float32: use --data.dtype float32")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=OBJECTIVES[cfg.method].find_unused_parameters)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision="bf16" if use_bf16 else "no", kwargs_handlers=[ddp])
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg.data.device = str(accelerator.device)  # the launcher decides; recorded in config.yaml below
    threads = choose_cpu_threads(cfg.data, accelerator.device.type == "cpu", accelerator.num_processes
                                 if accelerator.device.type == "cpu" else 1)
    run_dir = Path(args.out)
    resume_from = find_resume_checkpoint(args.resume, run_dir)
    if resume_from is not None:
        check_resumable(run_dir, cfg)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.dump(run_dir / "config.yaml")
        (run_dir / "versions.json").write_text(json.dumps(collect_versions(REPO_ROOT), indent=2) + "\n")

    # Epoch length from the manifest: schedules are written in epochs, training counts steps.
    global_batch = cfg.data.batch_size * world * cfg.optim.accum_steps
    samples = load_manifest(cfg.data.path)["samples"]
    steps_per_epoch = max(samples // global_batch, 1)
    total = cfg.run.steps
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    peak_lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.lr_reference_batch, cfg.optim.lr_scaling)

    set_seed(cfg.run.seed)  # identical initial weights on every rank
    objective = OBJECTIVES[cfg.method](cfg.objective, arch=cfg.model.arch, drop_path=cfg.model.drop_path,
                                       total_steps=total, steps_per_epoch=steps_per_epoch)
    weights = prepare_backbone(objective, cfg.model, fresh=resume_from is None)
    optimizer = torch.optim.AdamW(param_groups(objective, objective.student_backbone()), lr=peak_lr,
                                  betas=cfg.optim.betas)
    model, optimizer = accelerator.prepare(objective, optimizer)
    core = accelerator.unwrap_model(model)
    set_seed(cfg.run.seed + rank)  # per-rank streams for in-model randomness (edge dropout, drop path)

    # The loader is not passed to accelerator.prepare: it shards by rank and lands on the device itself.
    loader = build_loader(cfg.data, core.views(), rank, world)
    start = 0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        loader.load_state_dict(state["loader"])
        start = state["step"]
    batches = iter(loader)
    if resume_from is None and accelerator.is_main_process:  # the network at step 0, for "does it learn?"
        export_backbone(core.backbone(), run_dir / "init" / "backbone.safetensors")

    telemetry = Telemetry(run_dir, accelerator.is_main_process, start, total)
    telemetry.print(f"{cfg.method} | {cfg.model.arch} | {world} process(es) on {accelerator.device} | "
                    f"global batch {global_batch} | peak lr {peak_lr:.3g} | {steps_per_epoch} steps/epoch | {threads} | "
                    + (f"resumed from {resume_from}" if resume_from else "fresh start") + f" | {weights}")
    throughput = Throughput(global_batch, skip_steps=min(10, max(total - start, 1) // 5))
    flops_per_step = None
    window: dict[str, torch.Tensor] = {}  # sums of the logged scalars since the last record
    window_steps, step, t_start = 0, start, time.perf_counter()
    with GracefulStop() as stop:
        while step < total:
            t_step = time.perf_counter()
            lr = cosine_schedule(step, peak_lr, cfg.optim.min_lr, total, warmup_steps)
            wd = cosine_schedule(step, cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
            backbone_mult = backbone_lr_mult(cfg.optim, step)
            set_lr_wd(optimizer, lr, wd, backbone_mult)
            scheduled = core.begin_step(step)
            data_time, step_loss = 0.0, 0.0
            counting = args.report and flops_per_step is None
            with (FlopCounterMode(display=False) if counting
                  else contextlib.nullcontext()) as flop_counter:
                for micro in range(cfg.optim.accum_steps):
                    t_data = time.perf_counter()
                    # Starting a DataLoader draws from the global RNG: keep it off the training stream,
                    # or a resumed run's drop-path / edge-dropout draws would shift by one.
                    with torch.random.fork_rng(devices=[]):
                        batch = next(batches)
                    data_time += time.perf_counter() - t_data
                    last_micro = micro == cfg.optim.accum_steps - 1
                    with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                        loss, logs = model(batch)
                        accelerator.backward(loss / cfg.optim.accum_steps)
                    step_loss = step_loss + loss.detach() / cfg.optim.accum_steps
            if counting:
                flops_per_step = flop_counter.get_total_flops()
            core.before_optimizer_step(step)
            grad_norm = clip_gradients_(core.parameters(), cfg.optim.clip_grad, cfg.optim.clip_mode)

            # One small all-reduce per step: every rank learns of a non-finite value or a stop signal.
            local = torch.stack([~(torch.isfinite(step_loss) & torch.isfinite(grad_norm)),
                                 torch.tensor(stop.requested is not None, device=step_loss.device)]).float()
            either = accelerator.reduce(local.clone(), "max")
            (bad_here, _), (nonfinite, stopping) = (torch.stack([local, either]) > 0).tolist()
            if bad_here:
                dump = dump_nonfinite_batch(run_dir, rank, step, batch, {"loss": step_loss, "grad_norm": grad_norm,
                                                                         **logs})
                bad_samples = [loader.dataset.where(int(i)) for i in batch["sample"]] if "sample" in batch else []
                print(f"rank {rank}: non-finite loss or gradient at step {step} (loss {step_loss.item():.4g}, "
                      f"grad norm {grad_norm.item():.4g}); batch {bad_samples} saved to {dump}. The last good checkpoint is "
                      f"kept; lower optim.lr, raise optim.warmup_epochs or use --run.precision fp32, "
                      f"then continue with --resume auto.", file=sys.stderr)
            if nonfinite:
                telemetry.close()
                return EXIT_NONFINITE
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            core.after_step(step)
            step += 1
            throughput.add(time.perf_counter() - t_step, data_time)
            telemetry.step()

            for key, value in {"loss": step_loss, "grad_norm": grad_norm, **logs}.items():
                window[key] = window.get(key, 0.0) + value.detach().float()
            window_steps += 1
            if step % cfg.run.log_every == 0 or step == total or stopping:
                names = list(window)
                means = accelerator.reduce(torch.stack([window[k] for k in names]), "mean")
                scalars = {k: v / window_steps for k, v in zip(names, means.tolist())}
                scalars.update(lr=lr, backbone_lr=lr * backbone_mult, wd=wd, epoch=step / steps_per_epoch,
                               **scheduled, **throughput.window(),
                               memory_gib=peak_memory_gib(accelerator.device),
                               skipped_samples=sum(loader.skipped.values()))
                telemetry.log(step, scalars)
                window.clear()
                window_steps = 0
            if step % cfg.run.ckpt_every == 0 or step == total or stopping:
                saved = save_checkpoint(accelerator, core, run_dir, step, {"step": step, "loader": loader.state_dict()},
                                        cfg.run.keep_checkpoints)
                if accelerator.is_main_process:  # written to a temporary name, then renamed
                    export_backbone(core.backbone(), saved / "backbone.safetensors")
                    export_backbone(core.backbone(), run_dir / "backbone.safetensors")
            if stopping:
                telemetry.print(f"stopped by {stop.requested or 'another rank'} at step {step}; "
                                "continue with --resume auto")
                break

    telemetry.print(f"{step - start} steps in {time.perf_counter() - t_start:.0f} s; backbone: "
                    f"{run_dir / 'backbone.safetensors'}")
    if loader.skipped:  # unreadable samples were replaced by others; say which, never silently
        print(f"rank {rank} skipped {sum(loader.skipped.values())} unreadable sample(s): "
              + ", ".join(f"{where} x{n}" for where, n in loader.skipped.most_common(10)), file=sys.stderr)
    if args.report:
        write_report(run_dir, accelerator, throughput, flops_per_step, args.peak_tflops, telemetry)
    telemetry.close()
    accelerator.end_training()
    return 0


def write_report(run_dir: Path, accelerator: Accelerator, throughput: Throughput, flops_per_step: float | None,
                 peak_tflops: float | None, telemetry: Telemetry) -> None:
    """throughput.json: samples/s, data-wait share, MFU and peak memory of this run."""
    summary = throughput.summary()
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(accelerator.device)
    seconds_per_step = summary["step_ms"] / 1000
    report = {
        **summary, "processes": accelerator.num_processes, "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu",
        "tflops_per_step_per_rank": flops_per_step / 1e12 if flops_per_step else None,
        "mfu_pct": (100 * flops_per_step / seconds_per_step / peak
                    if flops_per_step and peak and math.isfinite(seconds_per_step) and seconds_per_step > 0 else None),
        "peak_memory_gib": peak_memory_gib(accelerator.device),
    }
    if accelerator.is_main_process:
        (run_dir / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    telemetry.print("throughput: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in report.items()))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        sys.exit(f"error: {err}")
