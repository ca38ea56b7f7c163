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
gets config.yaml, versions.json, checkpoints/step-NNNNNN/, backbone.safetensors (and the objective's
heads, e.g. SMTC's slots.safetensors; also in every checkpoint and in init/), tb/, log.jsonl.
"""
from __future__ import annotations

import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Only light imports here: the command line, the dataset and the run directory are checked in about
# a second, before main() imports torch, Accelerate and the objectives (several seconds).
import argparse  # noqa: E402
import contextlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from shard_tools.cli import EXIT_USAGE, ArgumentParser  # noqa: E402
from shard_tools.manifest import load_manifest  # noqa: E402
from train.config import (METHODS, SECTIONS, Config, ConfigError, add_config_arguments, config_tables,  # noqa: E402
                          load_config, overrides_from_args)
from train.rundir import RunDirError, check_run_dir, clear_run, find_resume_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Settings a resumed run must share with the run it continues (others, e.g. run.steps, may change).
MUST_MATCH = ("method", "model")
# Exit statuses besides 0 (done) and 2 (bad command line, configuration, dataset or run directory).
EXIT_NONFINITE = 3  # a non-finite loss or gradient; the last good checkpoint is kept
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGINT after a checkpoint; requeue with --resume auto


def build_parser(tables: dict[str, type], defaults: dict[str, dict] | None = None) -> ArgumentParser:
    parser = ArgumentParser(prog="train/run.py", description=__doc__, add_help=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true",
                        help="show this help and exit; with --method M, M's options and its YAML defaults")
    parser.add_argument("--method", required=True, choices=METHODS, help="objective to train")
    parser.add_argument("--data", help="dataset folder from shard_tools/pack.py (same as --data.path)")
    parser.add_argument("--out", required=True, help="run directory (created; reused by --resume auto)")
    parser.add_argument("--steps", type=int, help="optimiser steps of the whole run (same as --run.steps)")
    parser.add_argument("--config", help="YAML file layered over train/configs/<method>.yaml")
    parser.add_argument("--resume", default="none",
                        help="'auto': continue from the run's latest checkpoint if any; a checkpoint "
                             "folder: start from it; 'none' (default): start fresh, which a folder that "
                             "already holds a run refuses unless --overwrite is given")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that holds a previous run: its checkpoints, logs, "
                             "exported backbone and eval results are deleted first")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is visible")
    parser.add_argument("--report", action="store_true",
                        help="measure FLOPs on the first step and write throughput.json (samples/s, "
                             "data-wait %%, MFU, peak memory) at the end")
    parser.add_argument("--peak-tflops", type=float,
                        help="device peak for MFU in TFLOP/s (default: known bf16 peak of the GPU)")
    add_config_arguments(parser, tables, defaults)
    return parser


def print_help(argv: list[str]) -> None:
    """--help: with --method, that method's options and defaults (its YAML over the dataclasses)."""
    first = ArgumentParser(add_help=False)
    first.add_argument("--method", choices=METHODS)
    first.add_argument("--config")
    known, _ = first.parse_known_args(argv)
    defaults = load_config(known.method, known.config, {"data.path": "DIR"}).to_dict() if known.method else None
    build_parser(config_tables(known.method), defaults).print_help()


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The flags and the ``--section.key`` overrides, checked without torch (the method's own keys,
    e.g. --crw.size, are checked once its dataclass is imported)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print_help(argv)
        raise SystemExit(0)
    parser = build_parser(SECTIONS)
    args, extras = parser.parse_known_args(argv)
    overrides = overrides_from_args(args, extras, args.method, parser)
    if args.data:
        overrides["data.path"] = args.data
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    return args, overrides


def check_start(args: argparse.Namespace, overrides: dict) -> tuple[int, Path | None]:
    """Everything a run needs that is checkable before torch: the configuration but the method's own
    section, the dataset and the run directory. Returns the dataset's sample count and the
    checkpoint to resume from (None: a fresh start)."""
    cfg = load_config(args.method, args.config, overrides, objective=False)
    try:
        manifest = load_manifest(cfg.data.path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--data: {err}") from None
    if manifest["samples"] == 0:
        raise ConfigError(f"--data {cfg.data.path}: the dataset holds no samples (manifest.json lists why each "
                          "source was skipped); repack it from sources pack.py can read")
    check_run_dir(Path(args.out), args.resume, args.overwrite)
    return manifest["samples"], find_resume_checkpoint(args.resume, Path(args.out))


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


def check_cpu_memory(model, batch: dict, cfg: Config) -> None:
    """Stop before the first step when it would not fit in the memory the machine has free, naming
    the micro-batch that fits (CRW at the paper's batch 20 needs ~20 GB on a CPU)."""
    from train.telemetry import available_memory_bytes, step_memory_bytes

    available = available_memory_bytes()
    if available is None:
        return
    per_sample, fixed = step_memory_bytes(model, batch, cfg.data.batch_size)
    need = fixed + per_sample * cfg.data.batch_size
    usable = 0.8 * available  # headroom for the loader, the allocator and the backward's temporaries
    if need > usable:
        fits = int((usable - fixed) // per_sample) if per_sample else 0
        gib = 2**30
        raise ConfigError(
            f"--cpu: one step at data.batch_size {cfg.data.batch_size} needs about {need / gib:.1f} GiB "
            f"({per_sample / gib:.2f} GiB per sample, measured), {available / gib:.1f} GiB are free: "
            + (f"use --data.batch_size {fits} (with --optim.accum_steps "
               f"{math.ceil(cfg.data.batch_size / fits)} for the same global batch)" if fits >= 1 else
               "smaller views are needed (see `make demo` in the Makefile for settings that fit)"))


def dump_nonfinite_batch(run_dir: Path, rank: int, step: int, batch: dict, logs: dict) -> Path:
    import torch

    path = run_dir / f"nonfinite-step-{step:06d}-rank{rank}.pt"
    torch.save({"step": step, "batch": {k: v.cpu() for k, v in batch.items()},
                "logs": {k: float(v) for k, v in logs.items()}}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    samples, resume_from = check_start(args, overrides)

    # The command line, the dataset and the run directory are good: only now pay for torch.
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline import build_loader
    from train.checkpoint import GracefulStop, export_networks, load_checkpoint, save_checkpoint
    from train.finetune import backbone_lr_mult, prepare_backbone
    from train.objectives import OBJECTIVES
    from train.optim import clip_gradients_, cosine_schedule, param_groups, scaled_lr, set_lr_wd
    from train.telemetry import Telemetry, Throughput, collect_versions, peak_memory_gib
    from train.threads import choose_cpu_threads

    cfg = load_config(args.method, args.config, overrides)  # now with the method's own section
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
    if resume_from is not None:
        check_resumable(run_dir, cfg)

    # Epoch length from the manifest: schedules are written in epochs, training counts steps.
    global_batch = cfg.data.batch_size * world * cfg.optim.accum_steps
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
    if accelerator.device.type == "cpu":  # a GPU says "out of memory"; the kernel kills a CPU run silently
        with torch.random.fork_rng(devices=[]):
            first = next(batches)
        check_cpu_memory(core, first, cfg)
        batches = itertools.chain([first], batches)

    # Written only now that the run has started: a command that failed leaves the folder as it was.
    removed = []
    if accelerator.is_main_process:
        removed = clear_run(run_dir) if args.overwrite else []
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.dump(run_dir / "config.yaml")
        (run_dir / "versions.json").write_text(json.dumps(collect_versions(REPO_ROOT), indent=2) + "\n")
    accelerator.wait_for_everyone()
    if resume_from is None and accelerator.is_main_process:  # the network at step 0, for "does it learn?"
        export_networks(core, run_dir / "init")

    telemetry = Telemetry(run_dir, accelerator.is_main_process, start, total)
    if removed:
        telemetry.print(f"--overwrite: removed the previous run's {', '.join(removed)} from {run_dir}")
    telemetry.print(f"{cfg.method} | {cfg.model.arch} | {world} process(es) on {accelerator.device} | "
                    f"global batch {global_batch} | peak lr {peak_lr:.3g} | {steps_per_epoch} steps/epoch | {threads} | "
                    + (f"resumed from {resume_from}" if resume_from else "fresh start") + f" | {weights}")
    throughput = Throughput(global_batch, skip_steps=min(10, max(total - start, 1) // 5))
    flops_per_step = None
    window: dict[str, torch.Tensor] = {}  # sums of the logged scalars since the last record
    window_steps, step, t_start, stopped_by = 0, start, time.perf_counter(), None
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
                    export_networks(core, saved)
                    export_networks(core, run_dir)
            if stopping:
                stopped_by = stop.requested or "another rank"
                break

    telemetry.print((f"stopped by {stopped_by} at step {step} of {total} (exit {EXIT_INTERRUPTED}); continue with "
                     "--resume auto; " if stopped_by else "done: ")
                    + f"{step - start} steps in {time.perf_counter() - t_start:.0f} s, "
                    + (f"last loss {step_loss.item():.4g}; " if step > start else "") + f"backbone: {run_dir / 'backbone.safetensors'}")
    if loader.skipped:  # unreadable samples were replaced by others; say which, never silently
        print(f"rank {rank} skipped {sum(loader.skipped.values())} unreadable sample(s): "
              + ", ".join(f"{where} x{n}" for where, n in loader.skipped.most_common(10)), file=sys.stderr)
    if args.report:
        write_report(run_dir, accelerator, throughput, flops_per_step, args.peak_tflops, telemetry)
    telemetry.close()
    accelerator.end_training()
    return EXIT_INTERRUPTED if stopped_by else 0


def write_report(run_dir: Path, accelerator: Accelerator, throughput: Throughput, flops_per_step: float | None,
                 peak_tflops: float | None, telemetry: Telemetry) -> None:
    """throughput.json: samples/s, data-wait share, MFU and peak memory of this run."""
    import torch

    from train.telemetry import peak_flops, peak_memory_gib

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
    except (ConfigError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
