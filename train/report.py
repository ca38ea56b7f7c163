"""The demo's report: the learning table, training curves, propagation strips and PCA feature maps.

    python -m train.report --bench DIR      (DIR: the --out of python -m train.learning)

writes DIR/report.md and DIR/img/*.png. Curves are drawn with PIL (no plotting dependency).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from eval import visualize
from eval.davis_io import open_sequences, read_mask
from eval.features import dense_features, feature_stride, load_backbone, pads_to_cover_frame
from eval.label_prop import network_size, sequence_features
from eval.propagation_config import PRESETS
from train.learning import markdown_table
from train.rundir import read_log

CURVE_SIZE = (480, 240)
MARGIN = 36


def line_plot(series: dict[str, list[tuple[float, float]]], title: str) -> np.ndarray:
    """A small line plot, one colour per series, axes labelled with their ranges (uint8 RGB)."""
    width, height = CURVE_SIZE
    image = Image.new("RGB", CURVE_SIZE, "white")
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-6)
    box = (MARGIN, 20, width - 10, height - MARGIN)
    draw.rectangle(box, outline="black")
    scale = lambda x, y: (box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]),  # noqa: E731
                          box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]))
    colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
    for i, (name, values) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        draw.line([scale(x, y) for x, y in values], fill=colour, width=2)
        draw.text((box[0] + 6, box[1] + 4 + 12 * i), name, fill=colour)
    draw.text((4, 4), title, fill="black")
    draw.text((4, box[1]), f"{y1:.3g}", fill="black")
    draw.text((4, box[3] - 10), f"{y0:.3g}", fill="black")
    draw.text((box[0], box[3] + 4), f"step {x0:g}", fill="black")
    draw.text((box[2] - 60, box[3] + 4), f"step {x1:g}", fill="black")
    return np.asarray(image)


def curves(log: list[dict]) -> dict[str, np.ndarray]:
    """Loss, and for CRW the return accuracy of each walk length, against the step."""
    plots = {"loss": line_plot({"train loss": [(r["step"], r["loss"]) for r in log]}, "training loss")}
    accuracy = {key: [(r["step"], r[key]) for r in log] for key in sorted(log[0]) if key.startswith("acc_k")}
    if accuracy:
        plots["return_accuracy"] = line_plot(accuracy, "walk return accuracy (chance: 1 / nodes)")
    if "teacher_entropy" in log[0]:
        plots["teacher_entropy"] = line_plot({"teacher entropy": [(r["step"], r["teacher_entropy"]) for r in log]},
                                             "DINO teacher entropy")
    return plots


def truth_over_prediction(frames, truth, *predicted) -> np.ndarray:
    """Overlay strips, the ground truth above each prediction."""
    return np.concatenate([visualize.overlay_strip(frames, masks) for masks in (truth, *predicted)], axis=0)


def pca_strip(ckpt: str, sequence, protocol: str, short_side: int, count: int = 6) -> np.ndarray:
    """PCA (first three components -> RGB) of the backbone's features on evenly spaced frames."""
    backbone = load_backbone(ckpt)
    cfg = replace(PRESETS[protocol], short_side=short_side or None)
    net_size = network_size(*sequence.frame(0).shape[:2], cfg, feature_stride(backbone), pads_to_cover_frame(backbone))
    features = dense_features(backbone, final_norm=cfg.final_norm)
    feats = torch.stack(list(sequence_features(sequence, features, net_size, 8, torch.device("cpu"), cfg)))
    picks = np.linspace(0, len(feats) - 1, count).round().astype(int)
    maps = visualize.pca_rgb(feats[picks], size=net_size)
    return np.concatenate(list(maps), axis=1)


def write_report(bench: Path) -> Path:
    result = json.loads((bench / "learning.json").read_text())
    images = bench / "img"
    data = result["data"]
    held_out = (f"real sequences that were not trained on ({data['eval_data']}; trained on "
                f"{' '.join(data['train_data'])})" if "train_data" in data else
                "held-out synthetic sequences (rendered with another seed than the training videos)")
    lines = [f"# densevid learning report (budget {result['budget']})", "",
             f"Label propagation on {held_out}: the trained backbone, the same network at step 0, and raw 8x8 "
             "pixel cells.", "", markdown_table(result["rows"]), ""]
    sequences = open_sequences(result.get("davis", bench / "data" / "eval" / "davis"))
    for row in result["rows"]:
        method = row["method"]
        lines += [f"## {method}", "", "Training: `" + " ".join(row["train_command"][1:]) + "`", ""]
        for name, plot in curves(read_log(row["run_dir"])).items():
            path = visualize.save_png(images / f"{method}-{name}.png", plot)
            lines.append(f"![{method} {name}](img/{path.name})")
        for kind in ("trained", "init", "pixels"):
            lines.append(f"- {kind}: `python eval/run.py {' '.join(row['scores'][kind]['argv'])}`")
        lines += ["", "Propagation: ground truth (top), the trained backbone's prediction (middle), the same "
                      "network's at step 0 (bottom):", ""]
        for sequence in sequences[:2]:
            frames = [sequence.frame(i) for i in range(len(sequence.frames))]
            truth = [sequence.mask(stem) for stem in sequence.frame_stems]
            predicted = [[read_mask(bench / "eval" / method / kind / sequence.name / f"{stem}.png")
                          for stem in sequence.frame_stems] for kind in ("trained", "init")]
            path = visualize.save_png(images / f"{method}-{sequence.name}-truth-over-prediction.png",
                                      truth_over_prediction(frames, truth, *predicted))
            lines.append(f"![{sequence.name}](img/{path.name})")
        setting = row["setting"]
        for kind, ckpt in (("trained", row["run_dir"]), ("init", str(Path(row["run_dir"]) / "init"))):
            strip = pca_strip(ckpt, sequences[0], setting["protocol"], setting["short_side"])
            path = visualize.save_png(images / f"{method}-pca-{kind}.png", strip)
            lines += ["", f"PCA of the {kind} features ({sequences[0].name}):", "", f"![pca {kind}](img/{path.name})"]
        lines.append("")
    report = bench / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print(f"wrote {report}")
    return report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", required=True, help="output folder of python -m train.learning")
    return write_report(Path(parser.parse_args(argv).bench))


if __name__ == "__main__":
    main()
