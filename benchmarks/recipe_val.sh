#!/usr/bin/env bash
# Recipe settings re-checked on val (the test split is never read): each variant pretrains for fixed
# steps at seed 0, then `imagelm eval --split val`; the last command prints the table the recipes'
# comments quote. ~12 minutes a run on a 2-core CPU. Usage: bash benchmarks/recipe_val.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/recipe-val}
run() {   # name recipe overrides...
  local name=$1 recipe=$2; shift 2
  [ -e "$OUT/$name/eval/probes-val.json" ] && return
  [ -e "$OUT/$name/checkpoints" ] || .venv/bin/imagelm pretrain "$recipe" --out "$OUT/$name" "$@"
  .venv/bin/imagelm eval "$OUT/$name" --split val
}
for lr in 7.5e-4 1.5e-3 3e-3; do run "mae-lr$lr" mae-tiny train.steps=2000 train.lr=$lr; done   # recipe: 1.5e-3
run clip-b64 clip-tiny train.steps=2500                                                         # recipe: 64
run clip-b128 clip-tiny train.steps=1250 train.batch_size=128                                   # same samples
.venv/bin/imagelm compare "$OUT"/mae-lr7.5e-4 "$OUT"/mae-lr1.5e-3 "$OUT"/mae-lr3e-3 "$OUT"/clip-b64 "$OUT"/clip-b128 \
  --split val
