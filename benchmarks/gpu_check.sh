#!/usr/bin/env bash
# The GPU check (paper-scale shapes, bf16): AIM-0.6B trunk + 12-block head at 224 px / patch 14, and a
# ViT-B-sized variant, each against timm's VisionTransformer with the same mask, head and loss.
# Synthetic images: throughput does not depend on pixel content. Run from the repo root on a CUDA
# machine with timm installed; writes JSON next to this script's results/.
set -euo pipefail
export PYTHONPATH=$PWD
out=${OUT:-benchmarks/results}
python3 -m imagelm.cli bench aim-600m data.dataset=synthetic --batch-size 128 --steps 10 --json \
  | tee "$out/bench_aim600m.json"
python3 -m imagelm.cli bench aim-600m data.dataset=synthetic model.depth=12 model.dim=768 aim.head_depth=2 \
  --batch-size 256 --steps 10 --json | tee "$out/bench_vitb.json"
