"""Does streaming keep the GPU busy? The same recipe's training throughput reading WebDataset shards
from disk (JPEGs decoded, cropped and flipped in DataLoader workers) and reading synthetic images
already in memory, in one process: `shards_vs_synthetic` = shards img/s / synthetic img/s
(target >= 0.9). The shards are written by `imagelm data shards` from a generated folder of
`--images` JPEGs (random shapes and noise, 256-384 px) in a temporary folder.

    python benchmarks/shards_vs_synthetic.py [RECIPE] [--steps 25] [--batch-size 128] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(256, 385, 2))
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            d.rectangle([x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:06d}.jpg", quality=90)


def throughput(recipe: str, overrides: list[str], out: Path, steps: int) -> float:
    """Median img/s over the steps after the first third (allocation and worker start-up)."""
    from imagelm import config
    from imagelm.train import Trainer

    cfg = config.load(recipe, [*overrides, f"train.steps={steps}", "train.log_every=1", "train.ckpt_every=100000",
                               "train.warmup=0.0"])
    Trainer(cfg, out, progress=False).fit()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["img_per_s"] for r in rows[steps // 3:])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("recipe", nargs="?", default="aim-600m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=2560)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("overrides", nargs="*", default=[])
    args = p.parse_args()
    from imagelm.cli import main as cli

    work = Path(tempfile.mkdtemp(prefix="imagelm-shards-"))
    t0 = time.time()
    make_folder(work / "folder", args.images)
    t1 = time.time()
    assert cli(["data", "shards", "--from", str(work / "folder"), "--out", str(work / "shards"),
                "--shard-size", "256"]) == 0
    t2 = time.time()
    common = [f"train.batch_size={args.batch_size}", *args.overrides]
    res = {"recipe": args.recipe, "batch_size": args.batch_size, "images": args.images,
           "make_folder_s": t1 - t0, "write_shards_s": t2 - t1}
    res["shards_img_per_s"] = throughput(args.recipe, [*common, "data.dataset=shards",
                                                       f"data.root={work / 'shards'}"], work / "run-shards", args.steps)
    res["synthetic_img_per_s"] = throughput(args.recipe, [*common, "data.dataset=synthetic"], work / "run-synth",
                                            args.steps)
    res["shards_vs_synthetic"] = res["shards_img_per_s"] / res["synthetic_img_per_s"]
    print(json.dumps(res))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"shards_vs_synthetic_{args.recipe}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
