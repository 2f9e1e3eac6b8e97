"""Every recipe end to end on the machine's device, through the `imagelm` command itself: a few
training steps, then `eval` with every flag the method supports, `sample` where the method draws
pictures, and `tokenizer train`. Paper-size recipes keep their width but run 2 blocks deep on
synthetic images (the code path is the one the full model takes). Run it under
`torchrun --nproc_per_node=1` so that fsdp recipes are sharded and ddp ones wrapped, as on a cluster.

    torchrun --nproc_per_node=1 benchmarks/gpu_smoke.py [--out DIR] [--only RECIPE ...]

Prints one line per command and writes {recipe: {command: {"ok", "seconds", "error"}}} to
DIR/gpu_smoke.json; exits 1 if any command failed."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from imagelm import cli, config

STEPS = ["train.steps=3", "train.log_every=1", "train.ckpt_every=1000", "train.warmup=0.0"]
FAST_EVAL = ["--layers", "last:1", "eval.linear_iters=10", "eval.attentive_epochs=1", "eval.finetune_images=256",
             "eval.finetune_epochs=1", "eval.vl_steps=5", "eval.vl_batch=32", "eval.val_size=128"]
SYNTHETIC = ["data.dataset=synthetic", "train.batch_size=16"]
CORPUS = ["data.corpus_size=256", "train.batch_size=16"]
PAPER = ["model.depth=2", "train.batch_size=8", "data.dataset=synthetic"]      # paper width, 2 blocks

# recipe -> (pretrain overrides, eval flags); eval always adds FAST_EVAL
PLAN = {
    "aim-tiny": (SYNTHETIC, ["--finetune", "--baselines"]),
    "mae-tiny": (SYNTHETIC + ["train.compile=false"], ["--finetune"]),
    "beit-tiny": (SYNTHETIC + ["beit.tokenizer_steps=20"], ["--finetune"]),
    "igpt-tiny": (SYNTHETIC, ["--finetune"]),
    "clip-tiny": (CORPUS, ["--probe", "linear", "--zero-shot", "--retrieval"]),
    "lcl-tiny": (CORPUS, ["--probe", "linear"]),
    "beit3-tiny": (CORPUS + ["beit3.tokenizer_steps=20"], ["--probe", "linear", "--zero-shot", "--retrieval", "--itm"]),
    "aim-600m": (PAPER + ["aim.head_depth=1"], []),
    "aim-1b": (PAPER + ["aim.head_depth=1"], []),
    "aim-3b": (PAPER + ["aim.head_depth=1"], []),
    "aim-7b": (PAPER + ["aim.head_depth=1"], []),
    "mae-vit-b": (PAPER + ["mae.decoder_depth=1"], []),
    "mae-vit-l": (PAPER + ["mae.decoder_depth=1"], []),
    "mae-vit-h": (PAPER + ["mae.decoder_depth=1"], []),
    "beit-base": (PAPER + ["beit.tokenizer_steps=20", "beit.vocab=512"], []),
    "clip-vit-b16": (["model.depth=2", "model.in_chans=1", "clip.text_depth=2", "clip.text_vocab=2048"] + CORPUS,
                     ["--probe", "none", "--zero-shot", "--retrieval"]),
    "beit3-base": (["model.depth=2", "beit3.vl_layers=1", "model.in_chans=1", "beit3.tokenizer_steps=20", "beit3.vocab=512",
                    "beit3.text_vocab=2048"] + CORPUS, ["--probe", "none", "--zero-shot", "--retrieval", "--itm"]),
}
SAMPLES = {"mae-tiny": ["--reconstruct", "--n", "4"], "igpt-tiny": ["--complete", "top-half", "--n", "2", "--samples", "1"]}


def run(argv: list[str]) -> dict:
    """One `imagelm` command in this process: ok, seconds, and the error's last lines if any."""
    t0 = time.time()
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = cli.main(argv)
        ok, error = code == 0, None if code == 0 else err.getvalue()[-600:]
    except BaseException:      # noqa: BLE001 - a smoke reports every failure and goes on
        ok, error = False, traceback.format_exc()[-1500:]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"ok": ok, "seconds": round(time.time() - t0, 1), **({"error": error} if error else {})}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", nargs="*", help="these recipes only")
    args = p.parse_args()
    missing = sorted(set(config.recipe_names()) - set(PLAN))
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "recipes_without_a_plan": missing}
    work = Path(tempfile.mkdtemp(prefix="imagelm-smoke-"))
    for recipe in args.only or PLAN:
        overrides, flags = PLAN[recipe]
        run_dir = str(work / recipe)
        r = {"pretrain": run(["pretrain", recipe, *STEPS, *overrides, "--out", run_dir, "--no-progress"])}
        if r["pretrain"]["ok"]:
            r["eval"] = run(["eval", run_dir, *FAST_EVAL, *flags, "--json"])
            if recipe in SAMPLES:
                r["sample"] = run(["sample", run_dir, *SAMPLES[recipe], "--out", str(work / f"{recipe}.png")])
        results[recipe] = r
        print(f"{recipe}: " + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'} {v['seconds']}s" for k, v in r.items()),
              flush=True)
        for k, v in r.items():
            if not v["ok"]:
                print(f"  {k}: {v['error'].strip().splitlines()[-1] if v.get('error') else '?'}", flush=True)
    results["tokenizer"] = run(["tokenizer", "train", "tokenizer.steps=50", "--out", str(work / "tok"), "--json"])
    print(f"tokenizer train: {'ok' if results['tokenizer']['ok'] else 'FAILED'} {results['tokenizer']['seconds']}s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_smoke.json").write_text(json.dumps(results, indent=1))
    failed = [f"{r}/{k}" for r, v in results.items() if isinstance(v, dict) for k, c in v.items()
              if isinstance(c, dict) and not c.get("ok", True)] + \
        ([] if results["tokenizer"]["ok"] else ["tokenizer"])
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "every command ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
