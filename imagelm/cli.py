"""The `imagelm` command: pretrain, eval, compare, sample, tokenizer, data, bench, export."""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path

from imagelm import config
from imagelm.errors import TrainingDiverged, UserError

# what a user's input or machine causes, printed as one line (exit 2); anything else is a bug: traceback
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def positive(kind, zero: bool = False):
    """An argparse type: a finite number of `kind` (int or float), > 0 (>= 0 with `zero`)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}, got {text!r}")
        return v
    parse.__name__ = kind.__name__
    return parse


def layer_spec(text: str) -> str:
    if not config.LAYERS.ok(text):
        raise argparse.ArgumentTypeError(f"{text!r}: must {config.LAYERS.must}")
    return text


def cmd_pretrain(args) -> int:
    out = Path(args.out or f"runs/{Path(args.recipe).stem}")
    cfg = config.load(args.recipe, args.overrides)
    from imagelm.train import Trainer    # after the config: a bad one is reported without importing torch
    from imagelm import dist
    Trainer(cfg, out, minutes=args.minutes, resume=args.resume, progress=not args.no_progress).fit()
    dist.close()
    return 0


def cmd_eval(args) -> int:
    from imagelm.eval import PROBES, evaluate, table

    probes = {"all": PROBES, "none": ()}.get(args.probe, (args.probe,))
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    baselines = [b for b in config.BASELINES if b in (args.baselines or ()) or b in (args.baseline or ())]
    results = evaluate(Path(args.run), probes, args.layers, baselines, args.finetune, args.overrides,
                       args.zero_shot, args.retrieval, args.itm, args.split, log=log)
    if args.json:
        print(json.dumps(results))
    else:
        print(table(results))
        name = "probes.json" if args.split == "test" else "probes-val.json"
        print(f"results: {Path(args.run) / 'eval' / name}; plots: {Path(args.run) / 'plots'}")
    return 0


def cmd_compare(args) -> int:
    from imagelm.eval import compare

    print(compare([Path(r) for r in args.runs], args.split, args.markdown))
    return 0


def cmd_sample(args) -> int:
    import torch

    from imagelm import checkpoint, dist, viz
    from imagelm.data import sources
    from imagelm.data.transforms import normalize
    from imagelm.methods import build_method
    from imagelm.train import load_run_config

    run = Path(args.run)
    cfg = load_run_config(run)
    ckpt = checkpoint.latest(run / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoint")
    _, _, device = dist.init()
    method = build_method(cfg)
    checkpoint.load_into(method, ckpt)
    method.to(device).eval()
    from imagelm.methods import Completes, Reconstructs, require
    if args.reconstruct:
        require(method, Reconstructs, "sample --reconstruct")
    else:
        require(method, Completes, "sample --complete")
    data = sources.in_memory(sources.load(cfg.data, cfg.model, "test"), 1000)   # streamed sets: a sample
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data), generator=g)[: args.n]
    x = normalize(data.images[idx], data.mean, data.std).to(device)
    m = torch.tensor(data.mean).view(1, -1, 1, 1)
    s = torch.tensor(data.std).view(1, -1, 1, 1)
    show = lambda t: t * s + m  # noqa: E731  (back to [0, 1] pixels)
    if args.reconstruct:
        columns, what = _reconstructions(method, cfg, x, g, m, s)
    else:
        columns, what = _completions(method, cfg, x, g, args)
    out = viz.image_grid([show(c.float().cpu()) for c in columns], Path(args.out))
    print(f"wrote {out}: columns = {what}")
    return 0


def _reconstructions(method, cfg, x, g, m, s):
    import torch

    from imagelm.nn.embed import patchify, unpatchify

    pred, mask = method.reconstruct(x, torch.rand(len(x), method.noise_dim, generator=g).to(x.device))
    x, pred, mask = x.cpu(), pred.cpu(), mask.cpu()
    p, c = cfg.model.patch_size, cfg.model.in_chans
    patches = patchify(x, p)
    hidden = mask[..., None].bool()
    grey = torch.full_like(patches, (0.5 - m.mean().item()) / s.mean().item())
    masked = unpatchify(torch.where(hidden, grey, patches), p, c)
    pasted = unpatchify(torch.where(hidden, pred, patches), p, c)
    return [x, masked, unpatchify(pred, p, c), pasted], \
        "original, masked input, reconstruction, reconstruction + visible patches"


def _completions(method, cfg, x, g, args):
    import torch.nn.functional as F

    pal = method.encoder.palette
    r = pal.resolution
    keep = r // 2                                                    # --complete top-half
    up = lambda t: F.interpolate(t, size=x.shape[-2:], mode="nearest")  # noqa: E731
    cond = pal.dequantize(pal.quantize(x))
    cond[:, :, keep:] = cond.min()                                   # the rows the model must fill in
    samples = [up(method.complete(x, keep, args.temperature, args.top_k, g)) for _ in range(args.samples)]
    return [x, up(cond)] + samples, (f"original, the top half it is conditioned on ({r}x{r} palette pixels), "
                                     f"{args.samples} sampled completions (temperature {args.temperature}, "
                                     f"top-k {args.top_k or 'off'})")


def cmd_tokenizer(args) -> int:
    import time

    from imagelm.config import ModelConfig
    from imagelm.data import sources
    from imagelm.data.transforms import normalize
    from imagelm.tokenizers import visual

    job = config.build(visual.TokenizerJob,
                       config.apply_overrides(config.to_plain(visual.TokenizerJob()), args.overrides))
    model = ModelConfig(img_size=job.img_size, patch_size=job.tokenizer.patch_size, in_chans=job.tokenizer.in_chans)
    train = sources.load(job.data, model, "train")
    test = sources.in_memory(sources.load(job.data, model, "test", train), 10000)
    train = sources.in_memory(train, 50000)      # streamed sets: a bounded sample of decoded images
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    t0 = time.time()
    tok = visual.train_tokenizer(job.tokenizer, normalize(train.images, train.mean, train.std), args.minutes, log)
    stats = {**visual.tokenizer_stats(tok, normalize(test.images, test.mean, test.std)),
             "train_s": time.time() - t0, "kind": job.tokenizer.kind, "vocab": job.tokenizer.vocab}
    visual.save_tokenizer(tok, Path(args.out), stats)
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"{job.tokenizer.kind} tokenizer, {job.tokenizer.vocab} codes: codebook usage on test "
              f"{stats['codebook_usage']:.1%}, reconstruction MSE {stats['recon_mse']:.4f}; saved to {args.out}")
    return 0


def cmd_consolidate(args) -> int:
    from imagelm import checkpoint

    ckpt = checkpoint.latest(Path(args.run) / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{args.run} has no checkpoint")
    print(f"full weights: {checkpoint.consolidate(ckpt)}")
    return 0


def cmd_bench(args) -> int:
    from imagelm.bench import bench, report

    cfg = config.load(args.recipe, args.overrides)
    res = bench(cfg, batch_size=args.batch_size, steps=args.steps, peer=not args.no_peer)
    print(json.dumps(res) if args.json else report(res))
    return 0


def cmd_export(args) -> int:
    from imagelm.export import export

    out = export(Path(args.run), args.to, Path(args.out))
    how = {"timm": "timm.create_model(\"local-dir:{0}\", pretrained=True, num_classes=0)",
           "hf": "imagelm.load(\"{0}\")", "onnx": "onnxruntime.InferenceSession(\"{0}/model.onnx\")"}
    how = how[args.to].format(out)
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))}); load it with {how}")
    return 0


def cmd_data(args) -> int:
    from imagelm.data import corpora

    if args.kind == "shards":
        from imagelm.data.shards import write_shards
        if not args.src or not args.out:
            raise config.ConfigError("data shards needs --from FOLDER and --out DIR")
        write_shards(args.src, args.out, args.shard_size, args.max_side, args.workers, args.seed)
        return 0
    out = Path(args.out) if args.out else corpora.default_root() / args.kind
    for split in ("train", "test") if args.split == "both" else (args.split,):
        m = corpora.BUILDERS[args.kind](out / split, split, n=args.n, seed=args.seed, root=args.data_root)
        what = f"{m['documents']} documents ({out / split / m['jsonl']}), {m['samples']} images" \
            if m.get("jsonl") else f"{m['samples']} samples"
        print(f"{args.kind}/{split}: {what} in {len(m['shards'])} shards under {out / split} ({m['seconds']:.1f} s)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="imagelm", description=__doc__, epilog="A mistake in the input is reported "
                                "in one line (exit code 2); --debug anywhere on the line (or IMAGELM_DEBUG=1) "
                                "shows its traceback instead.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    sub = p.add_subparsers(dest="cmd", required=True)
    recipes = ", ".join(config.recipe_names())

    s = sub.add_parser("pretrain", help="pretrain a recipe", description=f"Pretrain a recipe ({recipes}) or a "
                       "YAML file; key=value pairs override it (e.g. train.lr=5e-4 aim.order=spiral).")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.add_argument("--out", help="run directory (default runs/RECIPE)")
    s.add_argument("--minutes", type=positive(float), help="wall-clock budget: stop cleanly, checkpoint, exit 0")
    s.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("eval", help="probe a run's encoder", description="Linear (per layer), attentive and "
                       "k-NN probes of a run's latest checkpoint; results go to RUN/eval/, plots to RUN/plots/.")
    s.add_argument("run")
    s.add_argument("overrides", nargs="*", metavar="eval.key=value", help="e.g. eval.attentive_lrs=[0.01] or eval.knn_k=10")
    s.add_argument("--probe", choices=["linear", "attentive", "knn", "all", "none"], default="all")
    s.add_argument("--zero-shot", action="store_true", help="image-text runs: zero-shot classification (prompt ensemble)")
    s.add_argument("--retrieval", action="store_true", help="image-text runs: image<->text R@1/5/10 on held-out scenes")
    s.add_argument("--itm", action="store_true",
                   help="fusion encoders (beit3): image-text matching, fine-tuned on scenes with hard negatives")
    s.add_argument("--layers", default="all", type=layer_spec, help="layers for the linear sweep: all, last:N or 1,3,5")
    s.add_argument("--baselines", action="store_const", const=config.BASELINES,
                   help=f"also probe the baselines: {' and '.join(config.BASELINES)}")
    s.add_argument("--baseline", action="append", choices=config.BASELINES, help="also probe this one baseline")
    s.add_argument("--finetune", action="store_true", help="also fine-tune end to end with a classifier (eval.finetune_* "
                   "keys: epochs, lr, images for low-data, gen_weight to keep the pretraining loss)")
    s.add_argument("--split", choices=["test", "val"], default="test",
                   help="test: choices on val, then test scored once; val: val figures only, test never read")
    s.add_argument("--json", action="store_true", help="print one JSON object (accuracies in [0, 1])")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("compare", help="one probe table over several evaluated runs",
                       description="Print the probe accuracies of several runs (from RUN/eval/probes.json) in one "
                       "table, with the baselines of the first run evaluated with --baselines.")
    s.add_argument("runs", nargs="+")
    s.add_argument("--split", choices=["test", "val"], default="test", help="which evaluation's figures")
    s.add_argument("--markdown", action="store_true", help="a Markdown table, seeds of a recipe as mean +- std")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("sample", help="pictures from a run: MAE reconstructions, iGPT completions",
                       description="Write a PNG grid from a run's latest checkpoint (test images).")
    s.add_argument("run")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--reconstruct", action="store_true",
                      help="original, masked input, reconstruction, reconstruction with visible patches pasted")
    what.add_argument("--complete", choices=["top-half"],
                      help="original, the conditioning top half, sampled completions (KV-cached sampling)")
    s.add_argument("--samples", type=positive(int), default=3, help="completions per image (--complete)")
    s.add_argument("--temperature", type=positive(float), default=1.0)
    s.add_argument("--top-k", type=positive(int, zero=True), default=0,
                   help="sample among the k likeliest tokens (0 = all)")
    s.add_argument("--n", type=positive(int), default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="grid.png")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("tokenizer", help="train a visual tokenizer (VQ or k-means)")
    tsub = s.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", description="Train a visual tokenizer on a dataset's patches and save it. Keys: "
                        "tokenizer.kind=vq|kmeans tokenizer.vocab=N tokenizer.patch_size=P tokenizer.steps=N "
                        "data.dataset=... img_size=N (defaults: Fashion-MNIST, patch 4, 512 codes).")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.add_argument("--out", required=True)
    t.add_argument("--minutes", type=positive(float))
    t.add_argument("--json", action="store_true", help="print {codebook_usage, recon_mse, ...} as JSON")
    t.set_defaults(fn=cmd_tokenizer)

    s = sub.add_parser("consolidate", help="a sharded (fsdp) run's full weights as one safetensors file",
                       description="Gather the latest checkpoint's shards (written by every rank of a train.parallel=fsdp "
                       "run) into RUN/checkpoints/step_N/model.safetensors, in one process. eval and export read the "
                       "shards themselves; this writes the file once, e.g. to copy it elsewhere.")
    s.add_argument("run")
    s.set_defaults(fn=cmd_consolidate)

    s = sub.add_parser("bench", help="throughput, FLOP/s and MFU of a recipe vs timm",
                       description="Measured matmul peak, training-step throughput, achieved FLOP/s and MFU for a "
                       "recipe, and a timm VisionTransformer of the same shape with the same loss, in one run.")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.add_argument("--batch-size", type=positive(int), default=256)
    s.add_argument("--steps", type=positive(int), default=10, help="timed steps per measurement (median reported)")
    s.add_argument("--no-peer", action="store_true", help="skip the timm comparison")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("data", help="write an image folder as WebDataset shards; build an image-text corpus",
                       description="shards: write an image folder (ROOT/CLASS/* or ROOT/{train,val,test}/CLASS/*) as "
                       "WebDataset shards (KEY.jpg|png + KEY.cls + KEY.json) for data.dataset=shards, in parallel; "
                       "rerunning skips complete shards. captions|scenes|interleaved: write captioned images "
                       "(WebDataset shards), two-item scenes with where-captions, or MMC4-style interleaved documents "
                       "with their image shards, to OUT/SPLIT/ (recipes build these into the cache on first use).")
    s.add_argument("kind", choices=["shards", "captions", "scenes", "interleaved"])
    s.add_argument("--from", dest="src", help="shards: the image folder to convert")
    s.add_argument("--shard-size", type=int, default=1000, help="shards: images per shard")
    s.add_argument("--max-side", type=int, default=0, help="shards: downscale images whose longer side exceeds this")
    s.add_argument("--workers", type=int, default=0, help="shards: writer processes (default: the CPU count)")
    s.add_argument("--out", help="corpus folder (default: the cache, $IMAGELM_CORPORA/KIND or "
                   "~/.cache/imagelm/corpora/KIND)")
    s.add_argument("--split", choices=["train", "test", "both"], default="both")
    s.add_argument("--n", type=positive(int),
                   help="samples (captions: first N images; scenes; interleaved: documents) per split")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-root", default="", help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    s.set_defaults(fn=cmd_data)

    s = sub.add_parser("export", help="a run's encoder for timm or as a Hugging Face-style folder",
                       description="Write a run's encoder (latest checkpoint) to OUT: --to timm gives model.safetensors "
                       "+ config.json in timm's hub layout (timm.create_model('local-dir:OUT', pretrained=True)); "
                       "--to hf gives config.json, model.safetensors and a README.md model card, loadable with "
                       "imagelm.load(OUT); --to onnx gives model.onnx (standardised pixels -> pooled features), "
                       "checked with onnxruntime. Nothing is uploaded.")
    s.add_argument("run")
    s.add_argument("--to", choices=["timm", "hf", "onnx"], required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_export)

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("IMAGELM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]     # accepted after the command too
    args, extra = p.parse_known_args(argv)
    if extra:     # key=value overrides after an option (argparse stops the positional list there)
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            p.print_usage(sys.stderr)
            p.exit(2, f"imagelm {args.cmd}: error: unrecognized arguments: {' '.join(extra)}\n")
        args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except Exception as e:
        user = isinstance(e, (UserError, *USER_OS_ERRORS)) or (isinstance(e, OSError) and e.errno in USER_ERRNOS)
        if debug or not (user or isinstance(e, TrainingDiverged)):
            raise
        print(f"imagelm {args.cmd}: error: {one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, TrainingDiverged) else 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"imagelm {args.cmd}: interrupted", file=sys.stderr)
        return 130


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"            # not "[Errno 2] No such file or directory: 'x'"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
