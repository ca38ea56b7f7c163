"""Backbone throughput and memory: our ViT per attention backend next to timm's, in one run.

Training rows: forward + backward of a batch of images (no optimizer step), in img/s, MFU (model
FLOPs / peak FLOPs of the device) and peak memory. Baselines are timm ViTs of the same shape:
eager attention, fused (SDPA) attention, and SDPA + torch.compile. Label-propagation rows: peak
memory of one frame's features at evaluation resolution (no_grad), per backend, and with the
last block's exact attention maps.

    python -m models.bench                                    # ViT-S/16 and ViT-B/16, batch 256, bf16
    python -m models.bench --models vit_small_patch16 --batch-size 128 --json out.json

timm is needed for the baseline rows only (``pip install 'densevid[dev]'``); without it they are
listed as skipped.
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention import xformers_works
from models.registry import build

VARIANTS = ("timm:eager", "timm:sdpa", "timm:sdpa+compile",
            "ours:math", "ours:sdpa", "ours:auto", "ours:xformers",
            "ours:sdpa+compile", "ours:auto+compile", "ours:xformers+compile")
BASELINE = "timm:sdpa+compile"
# Dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10": 125e12, "4090": 165e12}


@dataclass
class Row:
    model: str
    variant: str
    batch: int
    img_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    note: str = ""


def vit_forward_flops(embed_dim: int, depth: int, patch_size: int, height: int, width: int,
                      class_token: bool = True, mlp_ratio: float = 4.0) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image's ViT forward pass.

    Per block: qkv 6ND², proj 2ND², MLP 4·mlp_ratio·ND², scores and weighted sum 4N²D;
    plus the patch projection. Norms, softmax and GELU are not counted (MFU convention).
    """
    patches = (height // patch_size) * (width // patch_size)
    tokens = patches + int(class_token)
    d = embed_dim
    per_block = (8 + 4 * mlp_ratio) * tokens * d * d + 4 * tokens * tokens * d
    return int(depth * per_block + 2 * patches * 3 * patch_size * patch_size * d)


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def timm_vit(like: nn.Module, img_size: int, fused: bool) -> nn.Module:
    """timm's VisionTransformer with the same shape as ``like`` (no classifier head)."""
    from timm.models.vision_transformer import VisionTransformer

    layer_scale = getattr(like.blocks[0].ls1, "init_value", None)  # DINOv2's LayerScale and registers too
    model = VisionTransformer(img_size=img_size, patch_size=like.patch_size, embed_dim=like.embed_dim,
                              depth=len(like.blocks), num_heads=like.num_heads, num_classes=0,
                              init_values=layer_scale, reg_tokens=like.num_reg_tokens,
                              no_embed_class=like.num_pos_prefix_tokens == 0 and like.num_prefix_tokens > 0)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def make_variant(name: str, variant: str, img_size: int, device: torch.device, compile_backend: str = "inductor"
                 ) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]] | str:
    """The model of one variant and its patch-features function, or why it cannot run here.

    Both implementations return patch tokens after the final norm, so every row does the same work.
    """
    impl, _, setting = variant.partition(":")
    backend, _, compiled = setting.partition("+")
    allowed = {"ours": ("math", "sdpa", "auto", "xformers"), "timm": ("eager", "sdpa")}
    if backend not in allowed.get(impl, ()) or compiled not in ("", "compile"):
        raise ValueError(f"variant {variant!r} is not impl:backend[+compile]; known: {VARIANTS}")
    if impl == "ours":
        if backend == "xformers" and not (device.type == "cuda" and xformers_works()):
            return "no working CUDA xformers here"
        model = build(name, img_size=img_size, attn=backend).to(device)
        forward = lambda x: model.forward_features(x)["patches"]  # noqa: E731
    else:
        try:
            model = timm_vit(build(name, img_size=img_size), img_size, fused=backend == "sdpa").to(device)
        except ImportError:
            return "timm not installed (pip install 'densevid[dev]')"
        forward = lambda x: model.forward_features(x)[:, model.num_prefix_tokens:]  # noqa: E731
    return model, torch.compile(forward, backend=compile_backend) if compiled else forward


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_training(model: nn.Module, forward: Callable, batch: torch.Tensor, steps: int, warmup: int,
                  precision: str) -> tuple[float, float | None]:
    """img/s and peak GiB of forward + backward; parameters' grads are cleared every step."""
    device = batch.device
    model.train()
    reset_memory(device)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = forward(batch).float().mean()
        loss.backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)  # leave nothing behind that the next row's peak would count
    return batch.shape[0] * steps / seconds, peak_gib(device)


class LargestTensor(TorchDispatchMode):
    """Tracks the largest tensor any op produces (bytes): a device-independent memory witness."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out


def labelprop_memory(name: str, backend: str, size: tuple[int, int], device: torch.device, precision: str,
                     attention_maps: bool) -> dict:
    """Memory of one frame's features at evaluation resolution (no_grad): peak GiB (CUDA only) and
    the largest single tensor in MiB (any device)."""
    model = build(name, attn=backend).to(device).eval()
    frame = torch.randn(1, 3, *size, device=device)
    reset_memory(device)
    with torch.no_grad(), autocast(device, precision):
        model.forward_features(frame, return_attention=attention_maps)
        synchronize(device)
        peak = peak_gib(device)
        with LargestTensor() as largest:
            model.forward_features(frame, return_attention=attention_maps)
    return {"model": name, "backend": backend, "attention_maps": attention_maps, "peak_gib": peak,
            "largest_tensor_mib": largest.bytes / 2**20}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    flops_peak = peak_flops(device, args.peak_tflops)
    rows: list[Row] = []
    for name in args.models if args.variants else []:
        shape = build(name, img_size=args.img_size)
        flops = 3 * vit_forward_flops(shape.embed_dim, len(shape.blocks), shape.patch_size,
                                      args.img_size, args.img_size)  # forward + backward = 3 forwards
        for variant in args.variants:
            made = make_variant(name, variant, args.img_size, device, args.compile_backend)
            if isinstance(made, str):
                rows.append(Row(name, variant, args.batch_size, note=f"skipped: {made}"))
                continue
            torch.manual_seed(0)
            batch = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
            img_per_s, memory = time_training(*made, batch, args.steps, args.warmup, args.precision)
            mfu = img_per_s * flops / flops_peak if flops_peak else None
            rows.append(Row(name, variant, args.batch_size, img_per_s, mfu, memory))
            del made, batch
            torch._dynamo.reset()  # compiled graphs hold on to their model
            print(f"{name:20s} {variant:24s} {img_per_s:10.1f} img/s", flush=True)
    lp_rows = []
    for name in args.lp_models:
        for backend in ("math", "auto", "xformers"):
            if backend == "xformers" and not (device.type == "cuda" and xformers_works()):
                continue
            for maps in (False, True):
                lp_rows.append(labelprop_memory(name, backend, tuple(args.lp_size), device, args.lp_precision, maps))
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "settings": vars(args),
            "train": [asdict(row) for row in rows], "labelprop": lp_rows}


def format_tables(result: dict) -> str:
    """Markdown tables for docs/benchmarks.md; speed ratios are against timm SDPA+compile."""
    def number(value, fmt):
        return "–" if value is None else format(value, fmt)

    baseline = {row["model"]: row["img_per_s"] for row in result["train"] if row["variant"] == BASELINE}
    lines = [f"device: {result['device']}, torch {result['torch']}, batch {result['settings']['batch_size']}, "
             f"{result['settings']['img_size']} px, {result['settings']['precision']}", "",
             "| model | variant | img/s | vs timm SDPA+compile | MFU | peak GiB |", "|---|---|---|---|---|---|"]
    for row in result["train"]:
        base = baseline.get(row["model"])
        ratio = row["img_per_s"] / base if base and row["img_per_s"] else None
        speed = number(row["img_per_s"], ",.0f" if (row["img_per_s"] or 0) >= 100 else ".2f")
        lines.append(f"| {row['model']} | {row['variant']} | {speed} | "
                     f"{number(ratio, '.2f')}{'x' if ratio else ''} | {number(row['mfu'], '.1%')} | "
                     f"{number(row['peak_gib'], '.2f')}{' ' + row['note'] if row['note'] else ''} |")
    if result["labelprop"]:
        size = "x".join(map(str, result["settings"]["lp_size"]))
        lines += ["", f"Label propagation, one {size} frame, no_grad, {result['settings']['lp_precision']}:", "",
                  "| model | backend | last-block attention maps | peak GiB | largest tensor MiB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['backend']} | {'yes' if r['attention_maps'] else 'no'} | "
                  f"{number(r['peak_gib'], '.3f')} | {r['largest_tensor_mib']:.1f} |" for r in result["labelprop"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16", "vit_base_patch16"],
                        help="registered ViT names to benchmark (default: %(default)s)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS),
                        help="impl:backend[+compile] rows; impl is ours|timm, backend eager (timm only), "
                             "math, sdpa, auto or xformers (ours only); none for memory rows only "
                             "(default: all of %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="square training resolution (default: %(default)s)")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16",
                        help="autocast dtype of the training rows, the same for every row (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps first, compilation included (default: %(default)s)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the +compile rows, the same for ours and timm "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU in TFLOP/s (default: looked up from the GPU name)")
    parser.add_argument("--lp-models", nargs="*", default=["vit_small_patch16", "vit_small_patch8"],
                        help="models for the label-propagation memory rows; none to skip (default: %(default)s)")
    parser.add_argument("--lp-size", nargs=2, type=int, default=[480, 864], metavar=("H", "W"),
                        help="evaluation frame size, multiples of the patch size (default: %(default)s)")
    parser.add_argument("--lp-precision", choices=["bf16", "fp16", "fp32"], default="fp32",
                        help="precision of the label-propagation rows (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(format_tables(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
