"""Does the attentive probe's lr keep its rank from a subsample to the final fit's scale? For a run's
encoder: each lr in eval.attentive_lrs trained (together, 10 epochs) on 10,000 fit images and on
all of fit, scored on val. The test split is never read.

    .venv/bin/python benchmarks/attentive_lr_scale.py runs/mae-tiny --seeds 2      # ~2.5 min on 2 cores
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from imagelm import checkpoint, dist
from imagelm.eval import parse_layers, probe_sets
from imagelm.eval import features as feats
from imagelm.eval import probe as P
from imagelm.methods import build_method
from imagelm.train import load_run_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--seeds", type=int, default=2, help="probe seeds (the probes' init and batch order)")
    ap.add_argument("--subsample", type=int, default=10000)
    args = ap.parse_args()
    cfg = load_run_config(args.run)
    method = build_method(cfg)
    checkpoint.load_into(method, checkpoint.latest(args.run / "checkpoints"))
    _, _, device = dist.init()
    bf16 = dist.bf16_supported(device)
    train, _, _ = probe_sets(cfg, with_test=False)     # as `imagelm eval` reads them
    band = parse_layers(cfg.eval.attentive_layers, method.encoder.num_layers)
    tokens = feats.extract(method.encoder, train, [], band, cfg.eval.batch_size, bf16, device).tokens.to(device)
    y = train.labels.to(device)
    split = P.split_train(train.labels, cfg.eval.val_size, cfg.eval.seed)
    val_x, val_y = tokens[split.val], y[split.val]
    lrs, e = tuple(cfg.eval.attentive_lrs), cfg.eval
    print(f"{args.run.name}: val accuracy (%) per lr {', '.join(f'{lr:g}' for lr in lrs)}")
    for seed in range(args.seeds):
        for fit in (split.fit[:args.subsample], split.fit):
            probes = P.train_attentive(tokens, y, len(train.classes), e.attentive_epochs, lrs, e.attentive_heads,
                                       seed=seed, token_dtype=torch.bfloat16 if bf16 else torch.float32, rows=fit)
            val = [100 * P.accuracy(P.predict(p, val_x), val_y) for p in probes]
            print(f"  seed {seed}, {len(fit):>6} fit images: " + " / ".join(f"{v:.2f}" for v in val)
                  + f"  (best {lrs[max(range(len(val)), key=val.__getitem__)]:g})", flush=True)


if __name__ == "__main__":
    main()
