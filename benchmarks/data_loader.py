"""Streamed-data benchmarks (issue 22), in one run so ratios are measured on the same machine state:

1. data_time_to_first_step_s / data_peak_rss_mb: `imagelm pretrain aim-tiny` on a generated
   image folder (small PNGs) of 1,000 and of 100,000 images, one training step in a fresh process:
   seconds from process start to the end of step 1, and the peak resident memory of the training
   process (+ its largest DataLoader worker). Both should be flat in the number of images.
2. image_text_time_to_first_step_s / image_text_peak_rss_mb: `imagelm pretrain clip-tiny` on generated
   image-text WebDataset shards (img2dataset's layout: KEY.png + KEY.txt + KEY.json, 1,000 a shard,
   NNNNN_stats.json) of 2,000 and of 50,000 samples, one training step in a fresh process, as in 1:
   streamed, both should be flat in the number of samples (within 1.5x).
3. loader_img_per_s: images decoded + RandomResizedCrop(224) + flip per second by imagelm's
   streamed folder loader (2 workers, uint8 batches of 64), next to a plain PIL + numpy torch
   DataLoader doing the same work on the same files in the same run (ratio >= 1.0 is the target).
   Sources are JPEGs of 500x375 (ImageNet's typical size) and of 224x224.

    .venv/bin/python benchmarks/data_loader.py            # ~4 min on 2 cores (writes 100k files to /tmp)
    .venv/bin/python benchmarks/data_loader.py --sizes 1000 --images 512     # quick
    .venv/bin/python benchmarks/data_loader.py --no-first-step --no-throughput    # image-text only (~2 min)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RESULTS = Path(__file__).parent / "results" / "data_loader.json"


def make_png_folder(root: Path, n: int, size: int = 28, classes: int = 10) -> None:
    """n small PNGs in `classes` class folders (64 distinct images written round robin: writing,
    not encoding, is what 100k files cost)."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        buf = Path(tempfile.mktemp(suffix=".png"))
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf)
        blobs.append(buf.read_bytes())
        buf.unlink()
    for c in range(classes):
        (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "train" / f"c{i % classes}" / f"{i:07d}.png").write_bytes(blobs[i % 64])


FIRST_STEP = """
import resource, sys, time, json
t0 = float(sys.argv[1])
from imagelm import config
from imagelm.train import Trainer
cfg = config.load("aim-tiny", ["data.dataset=folder", "data.root=" + sys.argv[2], "train.steps=1", "data.workers=1",
                               "train.batch_size=64", "train.precision=fp32"])
from imagelm.data import sources
from imagelm.data.loader import make_loader
t1 = time.time()             # the data's own part: list, channel statistics, first batch from a worker
loader = make_loader(sources.load(cfg.data, cfg.model, "train"), cfg.data, 64, 0)
loader.batch(0)
data_s = time.time() - t1
loader.close()
tr = Trainer(cfg, sys.argv[3], progress=False)
tr.fit(until=1)
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"s": time.time() - t0, "data_s": data_s, "rss_mb": own, "worker_rss_mb": kids}))
"""


def first_step(folder: Path, py: str, script: str = FIRST_STEP) -> dict:
    out = Path(tempfile.mkdtemp(prefix="imagelm-bench-run-"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.time()
    p = subprocess.run([py, "-c", script, str(t0), str(folder), str(out / "run")], capture_output=True, text=True,
                       env=env)
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- image-text shards

WORDS = ["a photo of", "a picture of", "this is", "catalogue image:", "here we see"]
THINGS = ["a coat", "a pair of trousers", "a sneaker", "a bag", "an ankle boot", "a dress", "a shirt"]


def make_caption_shards(root: Path, n: int, per_shard: int = 1000, size: int = 64) -> None:
    """n image-text samples as img2dataset writes them (64 distinct PNGs written round robin,
    captions varied), with NNNNN_stats.json giving each shard's count."""
    import io
    import tarfile

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        k = min(n, s + per_shard) - s
        with tarfile.open(root / f"{s // per_shard:05d}.tar", "w") as tf:
            for i in range(s, s + k):
                cap = f"{WORDS[i % 5]} {THINGS[i % 7]} number {i}, {'dark' if i % 3 else 'light'}."
                for ext, data in (("png", blobs[i % 64]), ("txt", cap.encode()), ("json", b'{"similarity": 0.3}')):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        (root / f"{s // per_shard:05d}_stats.json").write_text(json.dumps({"successes": k}))


FIRST_STEP_CLIP = """
import resource, sys, time, json
t0 = float(sys.argv[1])
from imagelm import config
from imagelm.train import Trainer
cfg = config.load("clip-tiny", ["data.dataset=image-text", "data.root=" + sys.argv[2], "train.steps=1",
                                "data.workers=1", "train.precision=fp32"])
tr = Trainer(cfg, sys.argv[3], progress=False)
tr.fit(until=1)
s = time.time() - t0
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
from imagelm.data import sources
from imagelm.data.loader import make_loader
t1 = time.time()             # the data's own part again (warm): list, statistics, the caption sample, first batch
data = sources.load(cfg.data, cfg.model, "train")
texts = sources.preview(data).texts
text_s = time.time() - t1
loader = make_loader(data, cfg.data, cfg.train.batch_size, 0, text=tr.method.text_transform())
loader.batch(0)
data_s = time.time() - t1
loader.close()
print(json.dumps({"s": s, "data_s": data_s, "texts": len(texts), "text_sample_s": text_s, "rss_mb": own,
                  "worker_rss_mb": kids}))
"""


# ----------------------------------------------------------------------------- throughput

def make_jpegs(root: Path, n: int, w: int, h: int) -> None:
    rng = np.random.default_rng(1)
    (root / "train" / "a").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    for i in range(n):      # smooth photo-like content (noise would not compress like a photo)
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((w, h), Image.BICUBIC)
        img.save(root / "train" / "a" / f"{i:06d}.jpg", quality=90)


class PilRRC(torch.utils.data.Dataset):
    """The baseline: what a plain PIL pipeline (torchvision's RandomResizedCrop(interpolation=bicubic) + flip, without
    torchvision) does per image: open, convert, crop box, resize to 224, flip, to a tensor."""

    def __init__(self, files: list[str], size: int = 224):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        im = Image.open(self.files[i]).convert("RGB")
        W, H = im.size
        area = W * H * random.uniform(0.4, 1.0)
        r = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = min(W, int(round(math.sqrt(area * r)))), min(H, int(round(math.sqrt(area / r))))
        x, y = random.randint(0, W - w), random.randint(0, H - h)
        im = im.resize((self.size, self.size), Image.BICUBIC, box=(x, y, x + w, y + h))   # MAE/AIM: bicubic
        if random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _rate(next_batch, steps: int, batch: int) -> float:
    next_batch()                                    # workers up, first batch out: not timed
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        next_batch()
    return (steps - 1) * batch / (time.perf_counter() - t0)


def throughput(root: Path, n: int, batch: int = 64, workers: int = 2, rounds: int = 3) -> dict:
    """uint8 batches (the work both pipelines share), then batches as the trainer takes them:
    standardised float (on CPU here, in the main process: on a GPU this runs on the device)."""
    from imagelm.config import DataConfig, ModelConfig
    from imagelm.data import sources
    from imagelm.data.loader import make_loader
    from imagelm.data.transforms import normalize

    files = sorted(str(p) for p in (root / "train" / "a").iterdir())
    steps = n // batch
    cfg = DataConfig(dataset="folder", root=str(root), workers=workers)
    ds = sources.load(cfg, ModelConfig(img_size=224, patch_size=16, in_chans=3), "train")
    res = {}
    for final in (False, True):
        base, ours = [], []
        for _ in range(rounds):        # alternated, median: the machine's load changes under a run
            it = iter(torch.utils.data.DataLoader(PilRRC(files), batch_size=batch, shuffle=True,
                                                  num_workers=workers, drop_last=True))
            base.append(_rate((lambda: normalize(next(it), [0.5] * 3, [0.25] * 3)) if final else (lambda: next(it)),
                              steps, batch))
            del it
            loader = make_loader(ds, cfg, batch, seed=len(ours))
            step = iter(range(steps))
            ours.append(_rate((lambda: loader.batch(next(step))) if final else (lambda: loader.raw(next(step))),
                              steps, batch))
            loader.close()
        key = "standardised_float" if final else "uint8"
        b, o = float(np.median(base)), float(np.median(ours))
        res[key] = {"imagelm_img_per_s": o, "pil_dataloader_img_per_s": b, "ratio": o / b, "rounds": rounds}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--images", type=int, default=2048,
                    help="images per throughput measurement (fewer: the workers' start dominates)")
    ap.add_argument("--rounds", type=int, default=5, help="alternated measurements per pipeline (median)")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--no-first-step", action="store_true")
    ap.add_argument("--image-text-sizes", type=int, nargs="*", default=[2000, 50000],
                    help="samples of the generated image-text corpora clip-tiny's first step is timed on (none: skip)")
    args = ap.parse_args()
    res: dict = {"cpus": os.cpu_count(), "torch": torch.__version__, "first_step": {}, "throughput": {},
                 "image_text_first_step": {}}
    work = Path(tempfile.mkdtemp(prefix="imagelm-bench-data-", dir=args.tmp))
    try:
        for n in () if args.no_first_step else args.sizes:
            folder = work / f"png{n}"
            t0 = time.time()
            make_png_folder(folder, n)
            print(f"wrote {n} PNGs in {time.time() - t0:.0f}s", flush=True)
            r = first_step(folder, sys.executable)
            res["first_step"][str(n)] = {"data_time_to_first_step_s": r["s"], "data_setup_s": r["data_s"],
                                         "data_peak_rss_mb": r["rss_mb"], "worker_peak_rss_mb": r["worker_rss_mb"]}
            print(f"{n:>7} images: first step after {r['s']:.1f}s (of which listing, statistics and the first "
                  f"batch {r['data_s']:.1f}s), peak RSS {r['rss_mb']:.0f} MB (workers {r['worker_rss_mb']:.0f} MB)",
                  flush=True)
            shutil.rmtree(folder)
        if len(args.sizes) > 1 and not args.no_first_step:
            a, b = (res["first_step"][str(n)] for n in (min(args.sizes), max(args.sizes)))
            res["first_step_ratio"] = {k: b[k] / a[k] for k in ("data_time_to_first_step_s", "data_setup_s",
                                                                 "data_peak_rss_mb")}
        for n in args.image_text_sizes:
            shards = work / f"it{n}"
            t0 = time.time()
            make_caption_shards(shards, n)
            print(f"wrote {n} image-text samples in {time.time() - t0:.0f}s", flush=True)
            r = first_step(shards, sys.executable, FIRST_STEP_CLIP)
            res["image_text_first_step"][str(n)] = {
                "image_text_time_to_first_step_s": r["s"], "data_setup_s": r["data_s"],
                "caption_sample": r["texts"], "caption_sample_s": r["text_sample_s"],
                "image_text_peak_rss_mb": r["rss_mb"], "worker_peak_rss_mb": r["worker_rss_mb"]}
            print(f"{n:>7} image-text samples: clip-tiny's first step after {r['s']:.1f}s (listing, statistics, "
                  f"{r['texts']} captions and the first batch: {r['data_s']:.1f}s when repeated), peak RSS "
                  f"{r['rss_mb']:.0f} MB (workers {r['worker_rss_mb']:.0f} MB)", flush=True)
            shutil.rmtree(shards)
        if len(args.image_text_sizes) > 1:
            a, b = (res["image_text_first_step"][str(n)] for n in (min(args.image_text_sizes),
                                                                   max(args.image_text_sizes)))
            res["image_text_first_step_ratio"] = {k: b[k] / a[k] for k in (
                "image_text_time_to_first_step_s", "data_setup_s", "image_text_peak_rss_mb", "worker_peak_rss_mb")}
        for w, h in () if args.no_throughput else ((500, 375), (224, 224)):
            folder = work / f"jpg{w}"
            make_jpegs(folder, args.images, w, h)
            res["throughput"][f"{w}x{h}_to_224"] = rs = throughput(folder, args.images, rounds=args.rounds)
            for kind, r in rs.items():
                print(f"JPEG {w}x{h} -> 224 crops, 2 workers, {kind} batches: imagelm {r['imagelm_img_per_s']:.0f} "
                      f"img/s, plain PIL DataLoader {r['pil_dataloader_img_per_s']:.0f} img/s: {r['ratio']:.2f}x",
                      flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for k in ("first_step", "throughput", "image_text_first_step"):   # a partial run keeps the rest
        res[k] = {**old.get(k, {}), **res[k]}
    RESULTS.write_text(json.dumps({**old, **res}, indent=2))
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
