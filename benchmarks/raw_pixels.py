"""The raw-pixel baseline at the resolutions iGPT models see: the linear probe of `imagelm eval`
(standardised features, L-BFGS logistic regression, weight decay chosen on held-out train images)
on Fashion-MNIST pixels area-downsampled to each size. `imagelm eval --baselines` gives the 28 px
row; this adds the lower resolutions, the ceiling of a model that is fed them.

    .venv/bin/python benchmarks/raw_pixels.py            # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse

import torch.nn.functional as F

from imagelm.config import load
from imagelm.data import sources
from imagelm.eval.probe import linear_probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 14, 10])
    args = ap.parse_args()
    cfg = load("igpt-tiny")
    train = sources.load(cfg.data, cfg.model, "train")
    test = sources.load(cfg.data, cfg.model, "test", train=train)
    for r in args.sizes:
        x_train, x_test = (F.adaptive_avg_pool2d(d.images.float(), r).flatten(1) for d in (train, test))
        res = linear_probe(x_train, train.labels, x_test, test.labels, 10)
        print(f"raw pixels at {r:2d} px: linear {100 * res['acc']:.2f}% (weight decay {res['wd']:g})", flush=True)


if __name__ == "__main__":
    main()
