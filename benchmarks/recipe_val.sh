#!/usr/bin/env bash
# Recipe settings re-checked on val (the test split is never read): each variant pretrains for fixed
# steps at seed 0, then `imagelm eval --split val`; the last command prints the table the recipes'
# comments quote. ~10-12 minutes a run on a 2-core CPU. Usage: bash benchmarks/recipe_val.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/recipe-val}
runs=()
run() {   # name recipe overrides...
  local name=$1 recipe=$2; shift 2
  runs+=("$OUT/$name")
  [ -e "$OUT/$name/eval/probes-val.json" ] && return
  [ -e "$OUT/$name/checkpoints" ] || .venv/bin/imagelm pretrain "$recipe" --out "$OUT/$name" "$@"
  .venv/bin/imagelm eval "$OUT/$name" --split val
}
for lr in 7.5e-4 1.5e-3 3e-3; do run "mae-lr$lr" mae-tiny train.steps=2000 train.lr=$lr; done   # recipe: 1.5e-3
run clip-b64 clip-tiny train.steps=2500                                                         # recipe: 64
run clip-b128 clip-tiny train.steps=1250 train.batch_size=128                                   # same samples
run beit-b128 beit-tiny train.steps=2000                                       # recipe: batch 128, lr 2e-3
run beit-b256 beit-tiny train.steps=1000 train.batch_size=256 train.lr=3e-3   # the batch before, same samples
run beit-crops beit-tiny train.steps=2000 "data.crop_scale=[0.6,1.0]"          # recipe: no crops
run beit-v512 beit-tiny train.steps=2000 beit.vocab=512                        # recipe: 1024 codes
run igpt-256x3 igpt-tiny train.steps=1300                                      # recipe: GPT 256x3
run igpt-128x6 igpt-tiny train.steps=1750 model.dim=128 model.depth=6          # 1.35x faster a step: equal time
run igpt-8px igpt-tiny train.steps=2080 igpt.resolution=8                      # recipe: 10 px; 1.6x faster a step
run lcl-w1 lcl-tiny train.steps=1200 lcl.contrastive_weight=1                # the weight chosen before, on test
run lcl-w0.1 lcl-tiny train.steps=1200 lcl.contrastive_weight=0.1              # recipe: the reference's weight
run lcl-attn lcl-tiny train.steps=1200 lcl.contrastive_weight=0.1 lcl.pool=attention   # the paper's pooling of z
run lcl-lr1e-3 lcl-tiny train.steps=1200 train.lr=1e-3                         # recipe: lr 5e-4
run lcl-b64 lcl-tiny train.steps=600 train.batch_size=64                       # recipe: batch 32; same samples
.venv/bin/imagelm compare "${runs[@]}" --split val
