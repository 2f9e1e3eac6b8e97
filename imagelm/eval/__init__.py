"""The evaluation suite every checkpoint gets: `evaluate(run_dir, ...)` -> dict, saved under eval/."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from imagelm import checkpoint, dist
from imagelm.data import sources
from imagelm.eval import features as feats
from imagelm.eval import probe as P
from imagelm.config import ConfigError, apply_overrides, from_dict, to_plain
from imagelm.methods import build_method
from imagelm.train import load_run_config

PROBES = ("linear", "attentive", "knn")


def parse_layers(spec: str, depth: int) -> list[int]:
    """'all' -> 0..depth (0 = embeddings); 'last:N' -> the last N blocks; '2,4,6' -> those."""
    if spec == "all":
        return list(range(depth + 1))
    from imagelm.config import LAYERS
    if not LAYERS.ok(spec):
        raise ConfigError(f"bad layer list {spec!r}: it must {LAYERS.must}")
    if spec.startswith("last:"):
        return list(range(max(1, depth - int(spec[5:]) + 1), depth + 1))
    layers = sorted({int(x) for x in spec.split(",")})
    bad = [l for l in layers if not 0 <= l <= depth]
    if bad:
        raise ConfigError(f"layers {bad} are out of range: the encoder has layers 0..{depth} (0 = the embeddings)")
    return layers


def layer_sweep(name: str, probe, f_train: feats.Features, f_test: feats.Features, log=print) -> dict:
    """A pooled-feature probe at every extracted layer. The layer reported is the one that does
    best on held-out training images (never chosen on test); every layer's test figure is kept."""
    sweep = {}
    for layer in f_train.pooled:
        t0 = time.time()
        sweep[layer] = probe(f_train.pooled[layer], f_test.pooled[layer])
        log(f"  {name} layer {layer}: {sweep[layer]['acc']:.4f} ({time.time() - t0:.0f}s)")
    best = max(sweep, key=lambda l: sweep[l]["val_acc"])
    return {**sweep[best], "layer": best, "per_layer": {str(l): r["acc"] for l, r in sweep.items()}}


def run_probes(f_train: feats.Features, f_test: feats.Features, y_train, y_test, classes: int, probes, ecfg,
               token_layers=None, log=print) -> dict:
    def linear(train_x, test_x):
        return P.linear_probe(train_x, y_train, test_x, y_test, classes, ecfg.linear_wd, ecfg.val_size,
                              ecfg.linear_iters)

    def knn(train_x, test_x):
        return P.knn_probe(train_x, y_train, test_x, y_test, classes, ecfg.knn_k, ecfg.knn_t, ecfg.val_size)

    res = {name: layer_sweep(name, probe, f_train, f_test, log)
           for name, probe in (("linear", linear), ("knn", knn)) if name in probes}
    if res:
        best = (res.get("linear") or res["knn"])["layer"]
        res["features"] = {"layer": best, "dim": f_test.pooled[best].shape[1],
                           "effective_rank": P.effective_rank(f_test.pooled[best][:5000])}
    if "attentive" in probes and f_train.tokens is not None:
        t0 = time.time()
        res["attentive"] = {**P.attentive_probe(f_train.tokens, y_train, f_test.tokens, y_test, classes,
                                                ecfg.attentive_epochs, ecfg.attentive_lr, ecfg.attentive_heads),
                            "layers": token_layers}
        log(f"  attentive {token_layers}: {res['attentive']['acc']:.4f} ({time.time() - t0:.0f}s)")
    return res


def evaluate(run: Path, probes=PROBES, layers: str = "all", baselines: bool = False, finetune: bool = False,
             overrides: list[str] = (), zero_shot: bool = False, retrieval: bool = False, itm: bool = False,
             log=print) -> dict:
    """Probe (and optionally fine-tune) a run's latest checkpoint; `overrides` may change eval.* keys."""
    run = Path(run)
    cfg = load_run_config(run)
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise ConfigError(f"eval takes only eval.* overrides (the run's model and data are fixed): {', '.join(bad)}")
    if overrides:
        cfg = from_dict(apply_overrides(cfg.to_dict(), list(overrides)))
    ckpt = checkpoint.latest(run / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoint to evaluate")
    probe_data = cfg.data   # labelled images: the training data, or eval.dataset (e.g. for image-text runs)
    if cfg.eval.dataset:
        probe_data = dataclasses.replace(cfg.data, dataset=cfg.eval.dataset, root="", resize=True)
    train = sources.load(probe_data, cfg.model, "train")
    test = sources.load(probe_data, cfg.model, "test", train)
    ref = train    # the training data: its statistics standardise the probe images
    if cfg.eval.dataset:   # the encoder sees inputs standardised as in training
        ref = sources.load(cfg.data, cfg.model, "train")
        for d in (train, test):
            d.mean, d.std = ref.mean, ref.std
    classes = len(train.classes)
    fit = len(train) - cfg.eval.val_size      # the probes fit on these and choose on the val_size held out
    if fit < 1 and ("linear" in probes or "knn" in probes):
        raise ConfigError(f"eval.val_size={cfg.eval.val_size} holds out all {len(train)} training images, leaving "
                          f"none to fit the probes on: pass eval.val_size={max(1, len(train) // 5)}")
    if "knn" in probes and cfg.eval.knn_k > fit:
        log(f"warning: eval.knn_k={cfg.eval.knn_k} is more than the {fit} images the k-NN votes with; using k={fit}")
        cfg.eval = dataclasses.replace(cfg.eval, knn_k=fit)
    if train.labels is not None and (train.labels < 0).any() and (probes or finetune):
        raise ConfigError(f"{cfg.data.dataset} has no class labels to probe with: pass eval.dataset=fashion-mnist "
                          f"(or another labelled dataset)")
    _, _, device = dist.init()
    bf16 = dist.bf16_supported(device)

    def encoder_features(method):
        depth = method.encoder.num_layers
        lin = parse_layers(layers, depth) if ("linear" in probes or "knn" in probes) else []
        tok = parse_layers(cfg.eval.attentive_layers, depth) if "attentive" in probes else []
        t0 = time.time()
        out = [feats.extract(method.encoder, d, lin, tok, cfg.eval.batch_size, bf16, device) for d in (train, test)]
        log(f"  features: {len(train) + len(test)} images in {time.time() - t0:.0f}s")
        return out, tok

    results = {}
    if zero_shot or retrieval or itm:
        results.update(image_text_eval(run, cfg, ref, test, zero_shot, retrieval, itm, bf16, device, log))
    variants = [("pretrained", True)] + ([("random_init", False)] if baselines else [])
    if not probes and not finetune:
        variants, baselines = [], False
    for name, load in variants:
        log(f"{name}:")
        torch.manual_seed(cfg.train.seed)       # the same init the run started from
        method = build_method(cfg)
        weights = checkpoint.load_weights(ckpt, like=method.state_dict())
        if load:
            method.load_state_dict(weights)
        else:   # untrained, but with the run's fitted preprocessing (e.g. iGPT's palette): buffers only
            buffers = dict(method.named_buffers())
            method.load_state_dict({k: v for k, v in weights.items() if k in buffers}, strict=False)
        method.to(device)
        (f_train, f_test), tok = encoder_features(method)
        if f_train.labels is not None and len(f_train.labels):    # streamed data: the labels read with the images
            classes = max(classes, int(f_train.labels.max()) + 1)
        r = run_probes(f_train, f_test, f_train.labels, f_test.labels, classes, probes, cfg.eval, tok, log)
        if name == "pretrained":
            results.update(r)
            if hasattr(method, "latents"):     # a method's own latent (LCL's z): is it collapsed?
                results["latent"] = latent_stats(method, sources.in_memory(test), bf16)
            if finetune:
                from imagelm.eval.finetune import finetune as run_finetune
                t0 = time.time()
                results["finetune"] = run_finetune(method, sources.in_memory(train, cfg.eval.finetune_images or 50000),
                                                   sources.in_memory(test, 50000), probe_data, cfg.eval, device, bf16,
                                                   log)
                log(f"  finetune ({results['finetune']['images']} images): {results['finetune']['acc']:.4f} "
                    f"({time.time() - t0:.0f}s)")
        else:
            results[name] = r
    if baselines:
        log("raw_pixels:")
        f_train, f_test = (feats.raw_pixels(sources.in_memory(d), cfg.model.patch_size) for d in (train, test))
        results["raw_pixels"] = run_probes(f_train, f_test, f_train.labels, f_test.labels, classes, probes, cfg.eval,
                                           ["pixels"], log)
    results["checkpoint"] = str(ckpt.resolve())
    results["eval_config"] = to_plain(cfg.eval)
    (run / "eval").mkdir(exist_ok=True)
    path = run / "eval" / "probes.json"
    if path.exists():    # kept: other evaluations of the same checkpoint with the same settings
        old = json.loads(path.read_text())
        if old.get("checkpoint") == results["checkpoint"] and old.get("eval_config") == results["eval_config"]:
            # one level deep, so `--probe knn --baselines` keeps the baselines' other probes
            results = {**old, **{k: {**old[k], **v} if isinstance(v, dict) and isinstance(old.get(k), dict) else v
                                 for k, v in results.items()}}
    path.write_text(json.dumps(results, indent=2))
    from imagelm import viz
    viz.plot_run(run, results)
    return results


def latent_stats(method, test: sources.ImageData, bf16: bool, n: int = 5000) -> dict:
    from imagelm.data.transforms import normalize

    method.eval()
    device = dist.module_device(method)
    with torch.inference_mode(), dist.autocast(device, bf16):
        z = torch.cat([method.latents(normalize(b, test.mean, test.std).to(device)).float().cpu()
                       for b in test.images[:n].split(1024)])
    return {"effective_rank": P.effective_rank(z), "dim": z.shape[1], "mean_std": z.std(0).mean().item()}


def image_text_eval(run: Path, cfg, pairs: sources.ImageData, test: sources.ImageData, zero_shot: bool,
                    retrieval: bool, itm: bool, bf16: bool, device, log=print) -> dict:
    """Zero-shot accuracy on the labelled test images, retrieval on held-out scenes, and image-text
    matching on held-out scenes; `pairs` is the run's training data. A model with separate image
    and text paths but no joint space (BEiT-3) gets a short contrastive fine-tune of them first, on
    `pairs`; ITM fine-tunes its fusion path."""
    from imagelm.data.transforms import normalize
    from imagelm.eval import vl
    from imagelm.eval import zeroshot as Z

    def load():
        m = build_method(cfg)
        checkpoint.load_into(m, checkpoint.latest(run / "checkpoints"))
        if not hasattr(m, "load_tokenizer"):
            raise ConfigError(f"method '{cfg.method}' has no text encoder: --zero-shot/--retrieval/--itm need an "
                              f"image-text run such as clip or beit3")
        m.load_tokenizer(run, log=log)
        return m.to(device).eval()

    res, root, n = {}, cfg.data.root or None, cfg.data.corpus_size or None
    if zero_shot or retrieval:
        model = load()
        if not hasattr(model, "encode_text"):
            if not hasattr(model, "text_features"):
                raise ConfigError(f"method '{cfg.method}' has no text encoder in the image space: --zero-shot/"
                                  f"--retrieval need a contrastive image-text run such as clip, or image and text "
                                  f"paths to fine-tune (beit3)")
            t0 = time.time()
            if pairs.texts is None:
                raise ConfigError(f"{cfg.data.dataset} has no captions for the contrastive fine-tune")
            model = vl.contrastive_finetune(model, pairs, cfg.data, cfg.eval, device, bf16, log)
            res["contrastive_finetune"] = {"steps": cfg.eval.vl_steps, "seconds": round(time.time() - t0)}
        if zero_shot:
            t0 = time.time()
            names = Z.CLASSNAMES.get(cfg.eval.dataset or cfg.data.dataset, test.classes)
            res["zero_shot"] = Z.zero_shot(model, normalize(test.images, test.mean, test.std), test.labels, names,
                                           bf16)
            log(f"  zero-shot ({len(test)} images, {res['zero_shot']['prompts']} prompts per class): "
                f"{res['zero_shot']['acc']:.4f} ({time.time() - t0:.0f}s)")
        if retrieval:
            scenes = sources.image_text(["scenes"], "test", cfg.model.img_size, cfg.data.root, cfg.data.corpus_size)
            res["retrieval"] = Z.retrieval(model, normalize(scenes.images, test.mean, test.std), scenes.texts, bf16)
            r = res["retrieval"]
            log(f"  retrieval on {r['n']} held-out scenes: image->text R@1/5/10 {r['i2t_r1']:.3f}/{r['i2t_r5']:.3f}/"
                f"{r['i2t_r10']:.3f}, text->image {r['t2i_r1']:.3f}/{r['t2i_r5']:.3f}/{r['t2i_r10']:.3f}")
    if itm:
        model = load()
        if not hasattr(model, "pair_features"):
            raise ConfigError(f"method '{cfg.method}' has no fusion encoder (pair_features): --itm needs a run "
                              f"such as beit3")
        t0 = time.time()
        classes = list(sources.FASHION_MNIST_CLASSES)
        train_p = vl.scene_pairs("train", cfg.model.img_size, root, n, classes)
        test_p = vl.scene_pairs("test", cfg.model.img_size, root, n, classes)
        res["itm"] = vl.itm(model, train_p, test_p, test, cfg.data, cfg.eval, device, bf16, log)
        log(f"  image-text matching on {res['itm']['pairs']} held-out scene pairs (half hard negatives): "
            f"{res['itm']['acc']:.4f} ({time.time() - t0:.0f}s)")
    return res


def table(results: dict, name: str = "pretrained") -> str:
    """The printed comparison for one run: its encoder, then any baselines."""
    out = rows_table([(name, results)] + [(k, results[k]) for k in ("random_init", "raw_pixels") if k in results])
    if "retrieval" in results:
        r = results["retrieval"]
        out += (f"\nretrieval ({r['n']} held-out scenes): image->text R@1 {100 * r['i2t_r1']:.1f}%, R@5 "
                f"{100 * r['i2t_r5']:.1f}%, R@10 {100 * r['i2t_r10']:.1f}%; text->image R@1 {100 * r['t2i_r1']:.1f}%, "
                f"R@5 {100 * r['t2i_r5']:.1f}%, R@10 {100 * r['t2i_r10']:.1f}%")
    return out


def compare(runs: list[Path]) -> str:
    """One table over several runs' eval/probes.json (e.g. aim-tiny, mae-tiny, beit-tiny), with the
    baselines of the first run that has them."""
    rows, base = [], []
    for run in map(Path, runs):
        path = run / "eval" / "probes.json"
        if not path.exists():
            raise FileNotFoundError(f"{run} has no eval/probes.json: run `imagelm eval {run}` first")
        try:
            r = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"{path} is not readable JSON ({e}): run `imagelm eval {run}` again") from None
        rows.append((run.name, r))
        if not base:
            base = [(k, r[k]) for k in ("random_init", "raw_pixels") if k in r]
    return rows_table(rows + base)


# image-text columns, shown when some run has them: (title, section, key)
IMAGE_TEXT_COLUMNS = [("zero-shot", "zero_shot", "acc"), ("i2t R@1", "retrieval", "i2t_r1"),
                      ("t2i R@1", "retrieval", "t2i_r1"), ("itm", "itm", "acc")]


def rows_table(rows: list[tuple[str, dict]]) -> str:
    cols = [p for p in (*PROBES, "finetune") if any(p in r for _, r in rows)]
    extra = [c for c in IMAGE_TEXT_COLUMNS if any(c[1] in r for _, r in rows)]
    width = max(12, *(len(n) + 2 for n, _ in rows))
    lines = [f"{'encoder':<{width}}" + "".join(f"{c:>22}" for c in cols) + "".join(f"{c[0]:>11}" for c in extra)]
    for name, r in rows:
        cells = []
        for c in cols:
            e = r.get(c)
            where = f" (layer {e['layer']})" if e and "layer" in e and name != "raw_pixels" else ""
            cells.append(("-" if not e else f"{100 * e['acc']:.2f}%") + where)
        cells = [f"{c:>22}" for c in cells] + [f"{100 * r[sec][key]:.2f}%".rjust(11) if sec in r else f"{'-':>11}"
                                                for _, sec, key in extra]
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)
