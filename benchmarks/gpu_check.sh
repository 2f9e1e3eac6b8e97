#!/usr/bin/env bash
# The GPU check (paper-scale shapes, bf16), synthetic images (throughput does not depend on pixel
# content). Run from the repo root on a CUDA machine; writes JSON to $OUT or benchmarks/results/.
#   aim: AIM-0.6B trunk + 12-block head at 224 px / patch 14, and a ViT-B-sized variant, each
#        against timm's VisionTransformer with the same mask, head and loss (needs timm).
#   mae: MAE's visible-only encoder vs the full sequence with mask tokens (visible_only_speedup)
#        at the shapes of the MAE paper's wall-clock table: ViT-L and ViT-H, 8-block and 1-block
#        decoders (512 wide), plus ViT-B and mae-tiny; ViT-L/8 also at batch 256 and compiled
#        (train.compile=true), since small eager steps are launch-bound on a GPU.
# Usage: benchmarks/gpu_check.sh [aim|mae|all]
set -euo pipefail
export PYTHONPATH=$PWD
out=${OUT:-benchmarks/results}
what=${1:-all}
bench() { python3 -m imagelm.cli bench "$@" --steps 10 --json; }
if [[ $what == aim || $what == all ]]; then
  bench aim-600m data.dataset=synthetic --batch-size 128 | tee "$out/bench_aim600m.json"
  bench aim-600m data.dataset=synthetic model.depth=12 model.dim=768 aim.head_depth=2 \
    --batch-size 256 | tee "$out/bench_vitb.json"
fi
if [[ $what == mae || $what == all ]]; then
  vitl="model.dim=1024 model.depth=24 model.heads=16"
  vith="model.dim=1280 model.depth=32 model.heads=16 model.patch_size=14"
  bench mae-vit-b data.dataset=synthetic --batch-size 256 --no-peer | tee "$out/bench_mae_vitb_gpu.json"
  bench mae-vit-b data.dataset=synthetic $vitl --batch-size 128 --no-peer | tee "$out/bench_mae_vitl_gpu.json"
  bench mae-vit-b data.dataset=synthetic $vitl mae.decoder_depth=1 --batch-size 128 --no-peer \
    | tee "$out/bench_mae_vitl_d1_gpu.json"
  bench mae-vit-b data.dataset=synthetic $vith --batch-size 64 --no-peer | tee "$out/bench_mae_vith_gpu.json"
  bench mae-vit-b data.dataset=synthetic $vitl --batch-size 256 --no-peer | tee "$out/bench_mae_vitl_b256_gpu.json"
  bench mae-vit-b data.dataset=synthetic $vitl train.compile=true --batch-size 128 --no-peer \
    | tee "$out/bench_mae_vitl_compiled_gpu.json"
  bench mae-vit-b data.dataset=synthetic $vitl train.compile=true --batch-size 256 --no-peer \
    | tee "$out/bench_mae_vitl_b256_compiled_gpu.json"
  bench mae-tiny data.dataset=synthetic --batch-size 256 --no-peer | tee "$out/bench_mae_tiny_gpu.json"
  bench mae-tiny data.dataset=synthetic train.compile=true --batch-size 256 --no-peer \
    | tee "$out/bench_mae_tiny_compiled_gpu.json"
fi
