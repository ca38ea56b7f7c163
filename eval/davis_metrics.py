"""DAVIS-2017 J (region similarity) and F (boundary F-measure), with the toolkit's exact semantics.

Semantics follow davisvideochallenge/davis2017-evaluation (see docs/evaluation.md §1 of the team docs):

* J = |M ∩ G \\ V| / |M ∪ G \\ V|, and 1 when the union is empty.
* F: 1-pixel boundary maps (a pixel differs from its east, south or south-east neighbour; last row
  and column compare with one neighbour; bottom-right corner is 0), a boundary pixel matches when a
  pixel of the other boundary lies within a disk of radius ceil(0.008 * image diagonal) (8 px at
  854x480), precision/recall with the toolkit's empty-boundary cases, F = 2PR / (P + R).
* Semi-supervised task: first and last frame are not scored and void (255) counts as background.
  Unsupervised task: every frame is scored and void pixels are ignored.
* Per object: Mean, Recall (fraction of frames > 0.5), Decay (mean of the first quarter minus the
  last quarter, quarters sharing their boundary frame). The toolkit casts the quarter indices to
  uint8, which wraps beyond 256 frames; we use int64 (identical up to 256 frames).
* Global: plain mean over all (sequence, object) pairs; J&F-Mean = (J-Mean + F-Mean) / 2.

The disk dilation is replaced by an exact equivalent that needs neither OpenCV nor scikit-image: a
boundary pixel is within the dilated other boundary iff its Euclidean distance to the nearest pixel of
that boundary is <= radius, found for every frame at once with one k-d tree (frames are placed far
apart along a third axis so they never match across frames).
"""
import os, sys  # noqa: E401  (run as a script: make the repository root importable, not this folder)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from eval.davis_io import VOID_LABEL, Sequence, open_sequences, read_mask

BOUNDARY_THRESHOLD = 0.008
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def boundary_map(masks: np.ndarray) -> np.ndarray:
    """1-pixel boundaries of binary masks (..., H, W), offset half a pixel toward the origin."""
    seg = masks.astype(bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[..., :, :-1] = seg[..., :, 1:]
    south[..., :-1, :] = seg[..., 1:, :]
    south_east[..., :-1, :-1] = seg[..., 1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[..., -1, :] = seg[..., -1, :] ^ east[..., -1, :]
    boundary[..., :, -1] = seg[..., :, -1] ^ south[..., :, -1]
    boundary[..., -1, -1] = False
    return boundary


def tolerance_radius(height: int, width: int, bound_th: float = BOUNDARY_THRESHOLD) -> float:
    """Match radius in pixels: bound_th itself when >= 1, else ceil(bound_th * image diagonal)."""
    return float(bound_th) if bound_th >= 1 else float(math.ceil(bound_th * math.hypot(height, width)))


def region_similarity(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """J per frame for binary masks (..., H, W); 1 where both masks are empty."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    inter, union = gt & pred, gt | pred
    if void is not None:
        keep = ~void.astype(bool)
        inter, union = inter & keep, union & keep
    inter, union = np.count_nonzero(inter, axis=(-2, -1)), np.count_nonzero(union, axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def _matched_counts(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """For boundary stacks a, b (T, H, W): per frame, how many pixels of a lie within `radius` of
    some pixel of b, and vice versa."""
    frames, height, width = a.shape
    gap = height + width + 2 * radius + 1  # frame spacing along a third axis: no cross-frame match
    points_a, points_b = np.argwhere(a).astype(np.float64), np.argwhere(b).astype(np.float64)
    points_a[:, 0] *= gap
    points_b[:, 0] *= gap
    counts = []
    for source, target in ((points_a, points_b), (points_b, points_a)):
        if len(source) == 0 or len(target) == 0:
            counts.append(np.zeros(frames, dtype=np.int64))
            continue
        distance, _ = cKDTree(target).query(source, k=1, distance_upper_bound=radius + 0.5)
        # squared distances are integers, so <= radius (plus rounding slack) is exact
        hit = distance <= radius + 1e-6
        counts.append(np.bincount((source[hit, 0] / gap).round().astype(np.int64), minlength=frames))
    return counts[0], counts[1]


def boundary_f_measure(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
                       bound_th: float = BOUNDARY_THRESHOLD, image_size: tuple[int, int] | None = None
                       ) -> np.ndarray:
    """F per frame for binary masks (T, H, W) or (H, W). ``image_size`` is the full frame size when the
    masks are a crop of it (the tolerance radius comes from the full diagonal)."""
    if gt.ndim == 2:
        return boundary_f_measure(gt[None], pred[None], None if void is None else void[None], bound_th,
                                  image_size)[0]
    if void is not None:  # the toolkit takes boundaries of the masks with void pixels removed
        gt, pred = gt.astype(bool) & ~void.astype(bool), pred.astype(bool) & ~void.astype(bool)
    radius = tolerance_radius(*(image_size or gt.shape[-2:]), bound_th)
    gt_boundary, pred_boundary = boundary_map(gt), boundary_map(pred)
    n_pred = np.count_nonzero(pred_boundary, axis=(-2, -1))
    n_gt = np.count_nonzero(gt_boundary, axis=(-2, -1))
    pred_matched, gt_matched = _matched_counts(pred_boundary, gt_boundary, radius)
    precision = np.where(n_pred == 0, 1.0, pred_matched / np.maximum(n_pred, 1))
    recall = np.where(n_gt == 0, 1.0, gt_matched / np.maximum(n_gt, 1))
    # the toolkit's empty cases: no predicted boundary -> P=1, R=0 (unless GT is empty too), etc.
    recall = np.where((n_pred == 0) & (n_gt > 0), 0.0, recall)
    precision = np.where((n_pred > 0) & (n_gt == 0), 0.0, precision)
    total = precision + recall
    f = np.where(total == 0, 0.0, 2 * precision * recall / np.where(total == 0, 1, total))
    return f


def score_pair(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
               bound_th: float = BOUNDARY_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """J and F per frame of one object's (T, H, W) masks, computed on the crop holding both masks plus a
    one-pixel margin. Exact: outside it both masks are empty, so no boundary and no overlap lives there
    (the margin keeps each boundary pixel's east/south neighbours), and the radius uses the full size."""
    rows = np.flatnonzero(np.any(gt | pred, axis=(0, 2)))
    cols = np.flatnonzero(np.any(gt | pred, axis=(0, 1)))
    if len(rows) == 0:  # both empty in every frame
        return np.ones(len(gt)), np.ones(len(gt))
    size = gt.shape[-2:]
    window = (slice(None), slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
    gt, pred = gt[window], pred[window]
    void = None if void is None else void[window]
    return region_similarity(gt, pred, void), boundary_f_measure(gt, pred, void, bound_th, size)


def object_statistics(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, Recall and Decay of one object's per-frame scores (toolkit's ``db_statistics``)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    recall = float(np.mean(values > 0.5))
    bins = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
    quarters = [values[bins[i]:bins[i + 1] + 1] for i in range(4)]
    with np.errstate(invalid="ignore"):
        first = np.nanmean(quarters[0]) if np.isfinite(quarters[0]).any() else float("nan")
        last = np.nanmean(quarters[3]) if np.isfinite(quarters[3]).any() else float("nan")
    return mean, recall, float(first - last)


def split_objects(labels: np.ndarray, num_objects: int) -> np.ndarray:
    """(T, H, W) label maps -> (num_objects, T, H, W) binary masks for ids 1..num_objects."""
    ids = np.arange(1, num_objects + 1, dtype=labels.dtype)
    return labels[None] == ids[:, None, None, None]


@dataclass
class SequenceScores:
    """Per-object per-frame J and F of one sequence, (objects, frames) each."""

    name: str
    j: np.ndarray
    f: np.ndarray
    stats: dict = field(default_factory=dict)  # object index -> {"J": (M, R, D), "F": (M, R, D)}

    def __post_init__(self):
        for o in range(len(self.j)):
            self.stats[o] = {"J": object_statistics(self.j[o]), "F": object_statistics(self.f[o])}


def score_semisupervised(name: str, gt_labels: np.ndarray, pred_labels: np.ndarray,
                         num_objects: int) -> SequenceScores:
    """Score already-trimmed (first/last frame removed) GT and prediction label stacks (T, H, W).
    Void is background here (toolkit semantics for this task)."""
    gt_labels = np.where(gt_labels == VOID_LABEL, 0, gt_labels)
    predicted = int(pred_labels.max()) if pred_labels.size else 0
    if predicted > num_objects:
        raise ValueError(f"sequence {name}: prediction uses object id {predicted} but the first GT frame "
                         f"has only {num_objects} objects")
    j = np.zeros((num_objects, len(gt_labels)))
    f = np.zeros_like(j)
    for o in range(num_objects):  # objects one at a time keeps memory at one (T, H, W) stack
        j[o], f[o] = score_pair(gt_labels == o + 1, pred_labels == o + 1)
    return SequenceScores(name, j, f)


def pairwise_scores(gt_labels: np.ndarray, pred_labels: np.ndarray, num_gt: int, num_proposals: int,
                    void: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """J and F of every (proposal p, GT object g, frame t): two (num_proposals, num_gt, T) arrays.
    Proposal ids beyond those present are empty masks (the toolkit's zero padding)."""
    j = np.zeros((num_proposals, num_gt, len(gt_labels)))
    f = np.zeros_like(j)
    for g in range(num_gt):
        gt_g = gt_labels == g + 1
        for p in range(num_proposals):
            j[p, g], f[p, g] = score_pair(gt_g, pred_labels == p + 1, void)
    return j, f


def score_unsupervised(name: str, gt_labels: np.ndarray, pred_labels: np.ndarray,
                       max_proposals: int = 20) -> tuple[SequenceScores, np.ndarray]:
    """Official unsupervised protocol: voids ignored, all frames, one Hungarian matching per sequence on
    the frame-averaged (J + F) / 2 between proposals and GT objects. Returns the matched scores and the
    proposal id assigned to each GT object."""
    void = gt_labels == VOID_LABEL
    num_gt = int(np.where(void, 0, gt_labels)[0].max())
    num_proposals = int(pred_labels.max()) if pred_labels.size else 0
    if num_proposals > max_proposals:
        raise ValueError(f"sequence {name}: {num_proposals} proposal ids, the official protocol allows at "
                         f"most {max_proposals}; relabel the proposals to ids 1..{max_proposals}")
    j, f = pairwise_scores(gt_labels, pred_labels, num_gt, max(num_proposals, num_gt), void)
    rows, cols = linear_sum_assignment(-(j.mean(axis=2) + f.mean(axis=2)) / 2)
    order = np.argsort(cols)
    return SequenceScores(name, j[rows[order], cols[order]], f[rows[order], cols[order]]), rows[order] + 1


def load_sequence_masks(sequence: Sequence, results_dir: Path, task: str) -> tuple[np.ndarray, np.ndarray, int]:
    """GT and predicted label stacks for the frames the task scores, and the GT object count."""
    stems = sorted(sequence.masks)
    first = sequence.mask(stems[0])
    num_objects = int(np.where(first == VOID_LABEL, 0, first).max())
    if task == "semi-supervised":
        stems = stems[1:-1]
    if not stems:
        raise ValueError(f"sequence {sequence.name}: too few annotated frames to score (the semi-supervised task "
                         "skips the first and last); test sets without annotations can only be propagated "
                         "(--no-score)")
    gt = np.stack([sequence.mask(s) for s in stems])
    preds = []
    for stem in stems:
        path = results_dir / sequence.name / f"{stem}.png"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing prediction; the results folder must hold "
                                    f"<sequence>/<frame>.png for every scored frame")
        mask = read_mask(path)
        if mask.shape != gt.shape[1:]:
            raise ValueError(f"{path}: prediction is {mask.shape[1]}x{mask.shape[0]} but the annotation is "
                             f"{gt.shape[2]}x{gt.shape[1]}; write predictions at the annotation size")
        preds.append(mask)
    return gt, np.stack(preds), num_objects


def evaluate_sequences(sequences: Iterable[Sequence], results_dir: str | Path,
                       task: str = "semi-supervised") -> list[SequenceScores]:
    """Score sequences (from a DAVIS folder or evaluation shards) against a results folder."""
    scores = []
    for sequence in sequences:
        gt, pred, num_objects = load_sequence_masks(sequence, Path(results_dir), task)
        if task == "semi-supervised":
            scores.append(score_semisupervised(sequence.name, gt, pred, num_objects))
        else:
            scores.append(score_unsupervised(sequence.name, gt, pred)[0])
    return scores


def evaluate_folder(davis_dir: str | Path, results_dir: str | Path, subset: str = "val",
                    task: str = "semi-supervised") -> list[SequenceScores]:
    """Score every sequence of a DAVIS-layout folder or evaluation-shard folder against a results folder."""
    return evaluate_sequences(open_sequences(davis_dir, subset=subset, task=task), results_dir, task)


def global_table(scores: list[SequenceScores]) -> dict[str, float]:
    """Mean over all (sequence, object) pairs of each statistic, and J&F-Mean."""
    rows = [s.stats[o] for s in scores for o in s.stats]
    if not rows:
        raise ValueError("no objects were scored")
    table = {}
    for metric in ("J", "F"):
        for index, stat in enumerate(("Mean", "Recall", "Decay")):
            table[f"{metric}-{stat}"] = float(np.mean([r[metric][index] for r in rows]))
    table["J&F-Mean"] = (table["J-Mean"] + table["F-Mean"]) / 2
    return {key: table[key] for key in GLOBAL_COLUMNS}


def per_object_table(scores: list[SequenceScores]) -> list[dict]:
    """One row per (sequence, object): name ``<sequence>_<object id>``, J-Mean, F-Mean."""
    return [{"Sequence": f"{s.name}_{o + 1}", "J-Mean": s.stats[o]["J"][0], "F-Mean": s.stats[o]["F"][0]}
            for s in scores for o in s.stats]


def write_csvs(scores: list[SequenceScores], out_dir: str | Path, subset: str = "val") -> tuple[Path, Path]:
    """Toolkit-named CSVs (always rewritten, unlike the toolkit, which silently reuses old ones)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # --out may name a folder that does not exist yet
    global_path = out_dir / f"global_results-{subset}.csv"
    sequence_path = out_dir / f"per-sequence_results-{subset}.csv"
    table = global_table(scores)
    with open(global_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(GLOBAL_COLUMNS)
        writer.writerow([f"{table[c]:.6f}" for c in GLOBAL_COLUMNS])
    with open(sequence_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Sequence", "J-Mean", "F-Mean"])
        for row in per_object_table(scores):
            writer.writerow([row["Sequence"], f"{row['J-Mean']:.6f}", f"{row['F-Mean']:.6f}"])
    return global_path, sequence_path


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """Plain-text table, numbers with 3 decimals."""
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--davis", required=True, help="DAVIS-layout folder (JPEGImages/, Annotations/, ImageSets/) "
                        "or evaluation shards written by shard_tools/pack.py")
    parser.add_argument("--results", required=True, help="folder of <sequence>/<frame>.png index masks")
    parser.add_argument("--task", default="semi-supervised", choices=("semi-supervised", "unsupervised"),
                        help="semi-supervised: first/last frame excluded, void = background; unsupervised: "
                             "all frames, void ignored, one Hungarian matching per sequence (<= 20 proposals)")
    parser.add_argument("--set", default="val", help="subset: reads ImageSets/2017/<set>.txt (every masked "
                                                     "sequence when that file is missing)")
    parser.add_argument("--out", default=None, help="where the CSVs go, created if missing (default: the results folder)")
    args = parser.parse_args(argv)
    scores = evaluate_folder(args.davis, args.results, subset=args.set, task=args.task)
    table = global_table(scores)
    global_path, sequence_path = write_csvs(scores, args.out or args.results, args.set)
    print(format_table([table], GLOBAL_COLUMNS))
    print()
    print(format_table(per_object_table(scores), ("Sequence", "J-Mean", "F-Mean")))
    print(f"\nwrote {global_path} and {sequence_path}")
    return table


if __name__ == "__main__":
    main()
