"""Benchmark: our label propagation against the same propagation done the way DINO's script does it.

Both run the DINO protocol (first frame + 7 previous, top-5, square neighbourhood 12, temperature 0.1,
x16 bilinear upsampling, min-max, argmax, nearest resize to 854x480) on the same synthetic 480p video:
per-frame L2-normalised features on the ViT-S/16 grid of an 832x480 input (30x52 cells, 384 channels)
that drift smoothly over time, and a 3-object first-frame mask. Feature extraction is left out (it is the
same backbone forward for both); what is timed is everything after it, per frame.

The baseline (``dino_style_propagation``) is our re-implementation, in our words, of what
facebookresearch/dino's eval_video_segmentation.py does per frame: stack the context features, compute
the full (context x N x N) exp-affinity, multiply it by a dense N x N neighbourhood mask (built once per
video with Python loops over cells, as the script does), take the top-k along the key axis, zero the rest,
renormalise the columns, multiply with the stacked context labels, then upsample, min-max per channel in
a Python loop, argmax and resize with PIL.

    python eval/bench_label_prop.py --device cpu --frames 80
    python eval/bench_label_prop.py --device cuda --frames 80
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval.label_prop import first_frame_labels, propagate_video
from eval.propagation_config import PRESETS


def synthetic_video(frames: int, grid: tuple[int, int], dim: int, size: tuple[int, int], seed: int = 0,
                    device="cpu") -> tuple[list[torch.Tensor], np.ndarray]:
    """Smoothly drifting unit features (frames x (dim, h, w)) and a 3-object first-frame mask at `size`."""
    generator = torch.Generator().manual_seed(seed)
    h, w = grid
    base = torch.randn(dim, h, w + frames, generator=generator)
    feats = [F.normalize(base[:, :, t:t + w] + 0.3 * torch.randn(dim, h, w, generator=generator), dim=0).to(device)
             for t in range(frames)]
    height, width = size
    mask = np.zeros(size, np.uint8)
    mask[height // 4: height // 2, width // 6: width // 3] = 1
    mask[height // 2: 3 * height // 4, width // 2: 2 * width // 3] = 2
    mask[height // 8: height // 3, 3 * width // 4: 7 * width // 8] = 3
    return feats, mask


def _dino_neighbourhood_mask(h: int, w: int, size: int) -> torch.Tensor:
    """Dense (h*w, h*w) 0/1 mask filled cell by cell in Python, like DINO's restrict_neighborhood."""
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    ii, jj = i - size + p, j - size + q
                    if 0 <= ii < h and 0 <= jj < w:
                        mask[i, j, ii, jj] = 1
    return mask.reshape(h * w, h * w)


def dino_style_propagation(features: list[torch.Tensor], first_mask: np.ndarray, context: int = 7, topk: int = 5,
                           size_mask: int = 12, stride: int = 16) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Baseline: the DINO script's per-frame algorithm (see the module docstring). Returns the soft
    label maps (C, h, w) and the output masks of frames 1.."""
    dim, h, w = features[0].shape
    device = features[0].device
    height, width = first_mask.shape
    first_seg = first_frame_labels(first_mask, (h, w), "nearest", device)[None]     # (1, C, h, w)
    first_feat = features[0].reshape(dim, -1).T                                     # (N, D), unnormalised copy
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    neighbourhood = None
    softs, outputs = [], []
    for target in features[1:]:
        context_feats = [first_feat] + [f for f, _ in queue]
        context_segs = [first_seg] + [s for _, s in queue]
        feat_tar = target.reshape(dim, -1).T                                        # (N, D)
        sources = F.normalize(torch.stack(context_feats), dim=2).transpose(1, 2)   # (S, D, N)
        tar = F.normalize(feat_tar, dim=1)[None].repeat(len(context_feats), 1, 1)  # (S, N, D)
        aff = torch.exp(torch.bmm(tar, sources) / 0.1)                              # (S, N query, N key)
        if neighbourhood is None:
            neighbourhood = _dino_neighbourhood_mask(h, w, size_mask).to(device)[None]
        aff *= neighbourhood
        aff = aff.transpose(2, 1).reshape(-1, h * w)                                # (S*N key, N query)
        top_values, _ = torch.topk(aff, dim=0, k=topk)
        aff[aff < top_values.min(dim=0).values] = 0
        aff = aff / aff.sum(dim=0, keepdim=True)
        segs = torch.cat(context_segs)                                              # (S, C, h, w)
        num_classes = segs.shape[1]
        segs = segs.reshape(len(context_segs), num_classes, -1).transpose(2, 1).reshape(-1, num_classes).T
        soft = torch.mm(segs, aff).reshape(1, num_classes, h, w)
        if len(queue) == context:
            queue.pop(0)
        queue.append((feat_tar, soft))
        softs.append(soft[0])
        up = F.interpolate(soft, scale_factor=stride, mode="bilinear", align_corners=False)[0]
        for c in range(num_classes):  # DINO's norm_mask
            if up[c].max() > 0:
                up[c] = (up[c] - up[c].min()) / (up[c] - up[c].min()).max()
        ids = up.argmax(0).cpu().numpy().astype(np.uint8)
        outputs.append(np.array(Image.fromarray(ids).resize((width, height), Image.NEAREST)))
    return softs, outputs


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 to clear_refs resets the process's peak resident size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(name: str, fn, frames: int, device: torch.device) -> dict:
    _reset_peak(device)
    base = _peak_mib(device)
    started = time.perf_counter()
    masks = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {"name": name, "frames_per_second": (frames - 1) / seconds, "seconds": seconds,
            "peak_mib": _peak_mib(device), "peak_mib_above_start": _peak_mib(device) - base, "masks": masks}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--frames", type=int, default=80, help="video length")
    parser.add_argument("--dim", type=int, default=384, help="feature channels (ViT-S: 384)")
    parser.add_argument("--stride", type=int, default=16, help="patch size: 16 gives a 30x52 grid, 8 gives 60x104")
    parser.add_argument("--tile", type=int, default=PRESETS["dino"].tile, help="our query tile side in cells")
    parser.add_argument("--skip-baseline", action="store_true", help="time only our implementation")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size, net = (480, 854), (480, 832)
    grid = (net[0] // args.stride, net[1] // args.stride)
    feats, first_mask = synthetic_video(args.frames, grid, args.dim, size, device=device)
    cfg = replace(PRESETS["dino"], tile=args.tile)
    print(f"{args.frames} frames, grid {grid[0]}x{grid[1]}, dim {args.dim}, device {device}, "
          f"threads {torch.get_num_threads()}")

    ours = measure("densevid", lambda: list(propagate_video(feats, first_mask, size, cfg, args.stride)),
                   args.frames, device)
    rows = [ours]
    if not args.skip_baseline:
        rows.append(measure("dino-style", lambda: dino_style_propagation(feats, first_mask, stride=args.stride)[1],
                            args.frames, device))
        agreement = np.mean([(a == b).mean() for a, b in zip(ours["masks"], rows[1]["masks"])])
        print(f"pixel agreement between the two: {agreement:.6f}")
    for row in rows:
        print(f"{row['name']:>10}: {row['frames_per_second']:8.2f} frames/s  {row['seconds']:7.2f} s  "
              f"peak {row['peak_mib']:8.0f} MiB ({row['peak_mib_above_start']:+.0f} MiB during the run)")
    if len(rows) == 2:
        print(f"speed-up: {ours['frames_per_second'] / rows[1]['frames_per_second']:.1f}x")
    result = {"args": vars(args), "rows": [{k: v for k, v in r.items() if k != "masks"} for r in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
