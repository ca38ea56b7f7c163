#!/usr/bin/env bash
# `make demo`: the whole densevid flow on the embedded synthetic data, on a CPU in a few minutes:
#   synth.py -> pack.py (labelled training shards + DAVIS evaluation shards) -> train/run.py (a short
#   DINO run on a tiny ViT) -> eval/run.py (label propagation J&F, kNN).
# Usage: bash shard_tools/demo.sh [DEMO_DIR (default .demo)] [PYTHON (default python)]
# Rerunning resumes: packing finds its finished datasets, training continues its run directory.
set -euo pipefail
DEMO=${1:-.demo}
PY=${2:-python}
cd "$(dirname "$0")/.."

$PY shard_tools/synth.py --out "$DEMO/raw" --videos 12 --classes 3 --davis 2 --frames 32
$PY shard_tools/pack.py --kind videos --src "$DEMO/raw/videos" --out "$DEMO/shards/train" \
    --fps 25 --short-side 96 --shard-size 2e6 --workers 2
$PY shard_tools/pack.py --kind frames --src "$DEMO/raw/davis" --out "$DEMO/shards/davis"
$PY shard_tools/inspect.py "$DEMO/shards/train" --verify

$PY train/run.py --method dino --data "$DEMO/shards/train" --out "$DEMO/runs/dino" --steps 20 --cpu \
    --resume auto --data.batch_size 4 --data.num_workers 0 --model.arch vit_tiny_patch16 \
    --dino.global_size 64 --dino.local_size 32 --dino.local_crops 2 --dino.out_dim 256 \
    --dino.head_hidden_dim 64 --dino.head_bottleneck_dim 32
$PY eval/run.py labelprop --ckpt "$DEMO/runs/dino" --data "$DEMO/shards/davis" --device cpu
$PY eval/run.py knn --ckpt "$DEMO/runs/dino" --data "$DEMO/shards/train" --device cpu
