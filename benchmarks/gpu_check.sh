#!/usr/bin/env bash
# The GPU check: one go, under 8 minutes on one H200, from the repo root. JSON to $OUT or
# benchmarks/results/ (commit it). Fashion-MNIST is read from /usr/share/datasets/fashion-mnist, or
# from a copy of its four .gz files in .fmnist/ (carry it to a machine that has none).
#   smoke: every recipe end to end on CUDA through the imagelm command under torchrun (fsdp recipes
#          sharded): a few steps, eval with every flag the method supports, sample, tokenizer
#          (benchmarks/gpu_smoke.py -> gpu_smoke.json)
#   aim:   AIM-0.6B (1536 x 24, patch 14, 224 px, 12-block head) vs timm's VisionTransformer with the
#          same mask, head and loss (bench_aim600m.json)
#   big:   AIM-3B with fsdp + activation checkpointing on one GPU (bench_aim3b_fsdp_ac.json), and the
#          largest AIM that trains on it, AIM-7B, likewise (bench_aim7b_fsdp_ac.json)
#   data:  aim-600m reading WebDataset shards of JPEGs from disk vs synthetic images in memory, same
#          process (benchmarks/shards_vs_synthetic.py -> shards_vs_synthetic_aim-600m.json; target >= 0.9)
#   mae:   (not in all) MAE's visible-only encoder vs the full sequence at the MAE paper's shapes
# Usage: benchmarks/gpu_check.sh [all|smoke|aim|big|data|mae]
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
what=${1:-all}
fm=/usr/share/datasets/fashion-mnist
if [[ ! -e $fm/train-images-idx3-ubyte.gz && -d .fmnist ]]; then
  mkdir -p "$(dirname $fm)" && ln -sfn "$PWD/.fmnist" $fm
fi
status=0
# bench: its JSON line to $out/NAME.json; a failure is reported and the check goes on
bench() { local name=$1 limit=$2; shift 2
  echo "== $name: imagelm bench $*"
  if timeout "$limit" "$@" --json > "$out/$name.json.tmp" 2> "$out/$name.err"; then
    tail -n 1 "$out/$name.json.tmp" > "$out/$name.json" && rm -f "$out/$name.json.tmp" "$out/$name.err"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"  {r['img_per_s']:.0f} img/s, MFU \
{100*r['mfu']:.1f}%, peak {r.get('peak_mem_gb', 0):.1f} GB, timm {r.get('ratio_vs_timm')}\")" "$out/$name.json"
  else
    status=1; echo "  FAILED:"; tail -n 5 "$out/$name.err"
  fi
}
one=(torchrun --nproc_per_node=1 -m imagelm.cli bench)
if [[ $what == all || $what == smoke ]]; then
  if timeout 240 torchrun --nproc_per_node=1 benchmarks/gpu_smoke.py --out "$out" 2> "$out/gpu_smoke.err"; then
    rm -f "$out/gpu_smoke.err"
  else
    status=1; tail -n 20 "$out/gpu_smoke.err"
  fi
fi
if [[ $what == all || $what == aim ]]; then
  bench bench_aim600m 120 python3 -m imagelm.cli bench aim-600m data.dataset=synthetic --batch-size 128 --steps 10
fi
if [[ $what == all || $what == big ]]; then
  bench bench_aim3b_fsdp_ac 100 "${one[@]}" aim-3b data.dataset=synthetic --batch-size 128 --steps 5 --no-peer
  bench bench_aim7b_fsdp_ac 120 "${one[@]}" aim-7b data.dataset=synthetic --batch-size 32 --steps 5 --no-peer
fi
if [[ $what == all || $what == data ]]; then
  echo "== shards vs synthetic (aim-600m)"
  timeout 150 python3 benchmarks/shards_vs_synthetic.py aim-600m --out "$out" 2> "$out/shards.err" | tail -n 1 \
    && rm -f "$out/shards.err" || { status=1; tail -n 5 "$out/shards.err"; }
fi
if [[ $what == mae ]]; then
  vitl="model.dim=1024 model.depth=24 model.heads=16"
  bench bench_mae_vitb_gpu 120 python3 -m imagelm.cli bench mae-vit-b data.dataset=synthetic --batch-size 256 --no-peer
  bench bench_mae_vitl_gpu 120 python3 -m imagelm.cli bench mae-vit-b data.dataset=synthetic $vitl --batch-size 128 --no-peer
  bench bench_mae_vith_gpu 120 python3 -m imagelm.cli bench mae-vit-h data.dataset=synthetic --batch-size 64 --no-peer
fi
exit $status
