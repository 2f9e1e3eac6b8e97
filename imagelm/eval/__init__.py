"""The evaluation suite every checkpoint gets: `evaluate(run_dir, ...)` -> dict, saved under eval/."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path

import torch

from imagelm import checkpoint, dist
from imagelm.cache import cache_dir
from imagelm.data import sources
from imagelm.eval import features as feats
from imagelm.eval import probe as P
from imagelm.config import BASELINES, ConfigError, apply_overrides, from_dict, to_plain
from imagelm.methods import (EmbedsImageText, ExposesLatent, FusesImageText, ReadsText, SeparateImageTextPaths,
                             build_method, require)
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


def run_probes(f_train: feats.Features, y_train: torch.Tensor, split: P.Split, classes: int, probes, ecfg,
               test: tuple[feats.Features, torch.Tensor] | None = None, token_layers=None, device="cpu",
               bf16: bool = False, log=print) -> dict:
    """Every probe makes its choices on the split's fit/val images (test is not passed to them
    until then), then refits on fit + val and scores `test` once; with no test, val figures only.
    bf16: the attentive probe reads its tokens in bf16."""
    y = y_train.to(device)
    f_test, y_test = test if test else (None, None)
    res, seconds = {}, {}
    for name in ("linear", "knn"):
        if name not in probes:
            continue
        t0 = time.time()
        tst = (f_test.pooled, y_test) if test else None
        if name == "linear":
            res[name] = P.linear_probe(f_train.pooled, y, split, classes, tst, ecfg.linear_wd, ecfg.linear_iters,
                                       ecfg.select_images, log)
        else:
            res[name] = P.knn_probe(f_train.pooled, y, split, classes, tst, ecfg.knn_k, ecfg.knn_t, log)
        seconds[name] = time.time() - t0
        log(f"  {name}: layer {res[name]['layer']}, {_figures(res[name])} ({seconds[name]:.0f}s)")
    if res:
        best = (res.get("linear") or res["knn"])["layer"]
        val_x = f_train.pooled[best][split.val[:5000]]
        res["features"] = {"layer": best, "dim": val_x.shape[1], "effective_rank": P.effective_rank(val_x)}
    if "attentive" in probes and f_train.tokens is not None:
        t0 = time.time()
        tokens = f_train.tokens.to(device)
        tst = (f_test.tokens.to(device), y_test) if test else None
        res["attentive"] = {**P.attentive_probe(tokens, y, split, classes, tst, ecfg.attentive_epochs,
                                                ecfg.attentive_lrs, ecfg.attentive_heads,
                                                token_dtype=torch.bfloat16 if bf16 else torch.float32, log=log),
                            "layers": token_layers}
        seconds["attentive"] = time.time() - t0
        log(f"  attentive {token_layers}: lr {res['attentive']['lr']:g}, {_figures(res['attentive'])} "
            f"({seconds['attentive']:.0f}s)")
    for name, s in seconds.items():
        res[name]["seconds"] = round(s, 1)
    return res


def _figures(r: dict) -> str:
    return ", ".join(f"{name} {r[k]:.4f}" for name, k in (("val", "val_acc"), ("test", "acc")) if k in r)


def probe_data(cfg):
    """The data config of the labelled images probes read: the training data, or eval.dataset (e.g.
    for image-text runs)."""
    if cfg.eval.dataset:
        return dataclasses.replace(cfg.data, dataset=cfg.eval.dataset, root="", resize=True)
    return cfg.data


def probe_sets(cfg, with_test: bool = True):
    """The probes' images (`probe_data`), standardised with the training data's statistics, as the
    encoder saw its inputs: (train, test or None, the training data)."""
    data = probe_data(cfg)
    train = sources.load(data, cfg.model, "train")
    test = sources.load(data, cfg.model, "test", train) if with_test else None
    ref = train
    if cfg.eval.dataset:
        ref = sources.load(cfg.data, cfg.model, "train")
        for d in (train, test):
            if d is not None:
                d.mean, d.std = ref.mean, ref.std
    return train, test, ref


def evaluate(run: Path, probes=PROBES, layers: str = "all", baselines=(), finetune: bool = False,
             overrides: list[str] = (), zero_shot: bool = False, retrieval: bool = False, itm: bool = False,
             split: str = "test", log=print) -> dict:
    """Probe (and optionally fine-tune) a run's latest checkpoint; `overrides` may change eval.* keys.
    baselines: any of BASELINES, probed alike. split="val": the figures on the held-out train
    images only; the test split is never read."""
    run = Path(run)
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ConfigError(f"unknown baseline(s) {', '.join(sorted(unknown))}: choose from {', '.join(BASELINES)}")
    cfg = load_run_config(run)
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise ConfigError(f"eval takes only eval.* overrides (the run's model and data are fixed): {', '.join(bad)}")
    if overrides:
        cfg = from_dict(apply_overrides(cfg.to_dict(), list(overrides)))
    if split not in ("test", "val"):
        raise ConfigError(f"bad split {split!r}: 'test' (choices on val, then test once) or 'val' (val only)")
    if split == "val" and (zero_shot or retrieval or itm):
        raise ConfigError("--zero-shot, --retrieval and --itm are scored on test only: run them without --split val")
    ckpt = checkpoint.latest(run / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoint to evaluate")
    train, test, ref = probe_sets(cfg, with_test=split == "test")
    classes = len(train.classes)
    if not sources.labelled(train) and (probes or finetune):
        raise ConfigError(f"{cfg.data.dataset} has no class labels to probe with: pass eval.dataset=fashion-mnist "
                          f"(or another labelled dataset)")
    _, _, device = dist.init()
    bf16 = dist.bf16_supported(device)
    sets = [train] + ([test] if test is not None else [])
    in_memory = all(isinstance(d, sources.ImageData) for d in sets)
    parts = None

    def split_of(labels: torch.Tensor) -> P.Split:
        """The one fit/val split, made once: from the labels listed with the images, or (shards)
        those read with them in the first pass."""
        nonlocal parts
        if parts is not None and len(labels) == len(parts.fit) + len(parts.val):
            return parts
        split = P.split_train(labels, cfg.eval.val_size, cfg.eval.seed)   # (raw pixels of a streamed set: its sample)
        if "knn" in probes and cfg.eval.knn_k > len(split.fit):
            log(f"warning: eval.knn_k={cfg.eval.knn_k} is more than the {len(split.fit)} images the k-NN votes "
                f"with; using k={len(split.fit)}")
            cfg.eval = dataclasses.replace(cfg.eval, knn_k=len(split.fit))
        parts = parts or split
        return split

    def probe_all(f, tok, log):
        y_train = f[0].labels if f[0].labels is not None else train.labels
        y_test = (f[1].labels if f[1].labels is not None else test.labels) if test is not None else None
        tst = (f[1], y_test) if test is not None else None
        return run_probes(f[0], y_train, split_of(y_train), classes, probes, cfg.eval, tst, tok, device, bf16, log)

    def cached_unless_streamed(key_of, compute):
        return cached(key_of(), log, compute) if in_memory else compute()

    def encoder_probes(method, log):
        depth = method.encoder.num_layers
        lin = parse_layers(layers, depth) if ("linear" in probes or "knn" in probes) else []
        tok = parse_layers(cfg.eval.attentive_layers, depth) if "attentive" in probes else []
        t0 = time.time()
        f = [feats.extract(method.encoder, d, lin, tok, cfg.eval.batch_size, bf16, device) for d in sets]
        seconds = time.time() - t0
        log(f"  features: {sum(map(len, sets))} images in {seconds:.0f}s")
        r = probe_all(f, tok, log)
        if "features" in r:
            r["features"]["seconds"] = round(seconds, 1)
        return r

    results = {}
    if zero_shot or retrieval or itm:
        results.update(image_text_eval(run, cfg, ref, test, zero_shot, retrieval, itm, bf16, device, log))
    variants = [("pretrained", True)] + ([("random_init", False)] if "random_init" in baselines else [])
    if not probes and not finetune:
        variants, baselines = [], ()
    for name, load in variants:
        log(f"{name}:")
        torch.manual_seed(cfg.train.seed)       # the same init the run started from
        method = build_method(cfg)
        weights = checkpoint.load_weights(ckpt, like=method.state_dict())
        if load:
            method.load_state_dict(weights)
            method.to(device)
            results.update(encoder_probes(method, log))
        else:   # untrained, but with the run's fitted preprocessing (e.g. iGPT's palette): buffers only
            buffers = dict(method.named_buffers())
            method.load_state_dict({k: v for k, v in weights.items() if k in buffers}, strict=False)
            method.to(device)
            results[name] = cached_unless_streamed(
                lambda: cache_key(cfg.eval, probes, f"{layers} on {device}", sets, method.state_dict()),
                lambda: encoder_probes(method, log))
        if load and isinstance(method, ExposesLatent):     # a method's own latent (LCL's z): is it collapsed?
            results["latent"] = latent_stats(method, sources.in_memory(test if test is not None else train), bf16)
        if load and finetune:
            from imagelm.eval.finetune import finetune as run_finetune
            t0 = time.time()
            ft_train, ft_test = (sources.in_memory(train, cfg.eval.finetune_images or 50000),
                                 sources.in_memory(test, 50000) if test is not None else None)
            if test is None:     # fine-tune on fit, score val (the split of what is in memory: all of a small set)
                ft = P.split_train(ft_train.labels, cfg.eval.val_size, cfg.eval.seed)
                ft_train, ft_test = (dataclasses.replace(ft_train, images=ft_train.images[i], labels=ft_train.labels[i])
                                     for i in (ft.fit, ft.val))
            r = run_finetune(method, ft_train, ft_test, probe_data(cfg), cfg.eval, device, bf16, log)
            if test is None:
                r["val_acc"] = r.pop("acc")
            results["finetune"] = r
            log(f"  finetune ({r['images']} images): {_figures(r)} "
                f"({time.time() - t0:.0f}s)")
    if "raw_pixels" in baselines:
        log("raw_pixels:")
        results["raw_pixels"] = cached_unless_streamed(
            lambda: cache_key(cfg.eval, probes, "pixels", sets, {"patch_size": torch.tensor(cfg.model.patch_size)}),
            lambda: probe_all([feats.raw_pixels(sources.in_memory(d), cfg.model.patch_size) for d in sets],
                              ["pixels"], log))
    results["checkpoint"] = str(ckpt.resolve())
    results["eval_config"] = to_plain(cfg.eval)
    results["split"] = split
    (run / "eval").mkdir(exist_ok=True)
    path = run / "eval" / ("probes.json" if split == "test" else "probes-val.json")
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


# bump when a change to the probes changes their figures: cached baselines are then recomputed
PROBE_VERSION = 7


def cache_key(ecfg, probes, layers, sets: list[sources.ImageData], tensors: dict[str, torch.Tensor]) -> str:
    """A digest of everything a baseline's figures depend on: the images and labels of each split,
    their standardisation, the probe settings, and the weights (or the preprocessing) probed."""
    h = hashlib.sha256(json.dumps([PROBE_VERSION, to_plain(ecfg), sorted(probes), layers]).encode())
    for d in sets:
        h.update(json.dumps([d.mean, d.std, list(d.images.shape)]).encode())
        h.update(d.images.contiguous().numpy().tobytes())
        h.update(d.labels.numpy().tobytes())
    for k, t in sorted(tensors.items()):
        h.update(k.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def cached(key: str, log, compute) -> dict:
    """compute(), or its result saved under $IMAGELM_CACHE (~/.cache/imagelm) by an earlier run with `key`."""
    path = cache_dir("eval") / f"{key}.json"
    if path.exists():
        log(f"  cached: {path}")
        return json.loads(path.read_text())
    r = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(r))
    tmp.replace(path)
    return r


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
        require(m, ReadsText, "--zero-shot/--retrieval/--itm").load_tokenizer(run, log=log)
        return m.to(device).eval()

    res, (root, n) = {}, sources.corpus_place(cfg.data)
    if zero_shot or retrieval:
        model = load()
        if not isinstance(model, EmbedsImageText):
            require(model, SeparateImageTextPaths, "--zero-shot/--retrieval without a joint image-text space")
            t0 = time.time()
            # the captioned training images it fine-tunes on: a bounded sample of a streamed set
            pairs = sources.in_memory(pairs, min(50000, cfg.eval.vl_steps * cfg.eval.vl_batch))
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
            scenes = sources.image_text(["scenes"], "test", cfg.model.img_size, root or "", n or 0)   # 2,000 scenes
            res["retrieval"] = Z.retrieval(model, normalize(scenes.images, test.mean, test.std), scenes.texts, bf16)
            r = res["retrieval"]
            log(f"  retrieval on {r['n']} held-out scenes: image->text R@1/5/10 {r['i2t_r1']:.3f}/{r['i2t_r5']:.3f}/"
                f"{r['i2t_r10']:.3f}, text->image {r['t2i_r1']:.3f}/{r['t2i_r5']:.3f}/{r['t2i_r10']:.3f}")
    if itm:
        model = load()
        require(model, FusesImageText, "--itm")
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


def load_results(run: Path, split: str = "test") -> dict:
    """A run's evaluation; for split="val" a --split val one, else the val figures of a full one
    (the same choices: test is scored after them)."""
    path = run / "eval" / ("probes.json" if split == "test" else "probes-val.json")
    if split == "val" and not path.exists() and (run / "eval" / "probes.json").exists():
        path = run / "eval" / "probes.json"
    if not path.exists():
        flag = "" if split == "test" else " --split val"
        raise FileNotFoundError(f"{run} has no {path.relative_to(run)}: run `imagelm eval {run}{flag}` first")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not readable JSON ({e}): run `imagelm eval {run}` again") from None


def compare(runs: list[Path], split: str = "test", markdown: bool = False) -> str:
    """One table over several runs' evaluations (e.g. aim-tiny, mae-tiny, beit-tiny), with the
    baselines of the first run that has them. markdown: runs whose configs differ only in
    train.seed are one row, each figure the mean +- std over those seeds; the random-init row is
    then over the seeds of that first run's row that were evaluated with --baselines (raw pixels
    have no seed: one)."""
    rows, base = [], []
    for run in map(Path, runs):
        r = load_results(run, split)
        rows.append((run, r))
        if not base:
            base = [(k, r[k]) for k in ("random_init", "raw_pixels") if k in r]
    if not markdown:
        return rows_table([(run.name, r) for run, r in rows] + base)
    groups: dict[str, list] = {}
    for run, r in rows:
        d = load_run_config(run).to_dict()
        d["train"].pop("seed")
        d.pop("eval")
        groups.setdefault(json.dumps(d, sort_keys=True), []).append((run, r))
    named = [(re.sub(r"[-_]s(eed)?\d+$", "", g[0][0].name), [r for _, r in g]) for g in groups.values()]
    seeds = next((g for _, g in named if any("random_init" in r for r in g)), [])
    base = [(k, [r[k] for r in seeds if k in r] if k == "random_init" else [v]) for k, v in base]
    return markdown_table(named + base, "acc" if split == "test" else "val_acc")


def _cell(results: list[dict], section: str, key: str) -> str:
    xs = [100 * r[section][key] for r in results if key in r.get(section, {})]
    if not xs:
        return "-"
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{mean:.2f}"
    std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{mean:.2f} ± {std:.2f}"


def markdown_table(groups: list[tuple[str, list[dict]]], key: str = "acc") -> str:
    """| encoder | seeds | linear | attentive | k-NN | ...: accuracy in %, mean ± std (sample) over seeds."""
    cols = [(p, p, key) for p in (*PROBES, "finetune") if any(p in r for _, g in groups for r in g)]
    cols += [c for c in IMAGE_TEXT_COLUMNS if key == "acc" and any(c[1] in r for _, g in groups for r in g)]
    lines = ["| encoder | seeds | " + " | ".join(f"{t} (%)" for t, _, _ in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for name, g in groups:
        lines.append(f"| {name} | {len(g)} | " + " | ".join(_cell(g, s, k) for _, s, k in cols) + " |")
    return "\n".join(lines)


# image-text columns, shown when some run has them: (title, section, key)
IMAGE_TEXT_COLUMNS = [("zero-shot", "zero_shot", "acc"), ("i2t R@1", "retrieval", "i2t_r1"),
                      ("t2i R@1", "retrieval", "t2i_r1"), ("itm", "itm", "acc")]


def rows_table(rows: list[tuple[str, dict]]) -> str:
    """Test accuracy of each probe (val accuracy, marked, for a --split val evaluation)."""
    cols = [p for p in (*PROBES, "finetune") if any(p in r for _, r in rows)]
    extra = [c for c in IMAGE_TEXT_COLUMNS if any(c[1] in r for _, r in rows)]
    width = max(12, *(len(n) + 2 for n, _ in rows))
    lines = [f"{'encoder':<{width}}" + "".join(f"{c:>22}" for c in cols) + "".join(f"{c[0]:>11}" for c in extra)]
    for name, r in rows:
        cells = []
        for c in cols:
            e = r.get(c)
            where = f" (layer {e['layer']})" if e and "layer" in e and name != "raw_pixels" else ""
            figure = "-" if not e else f"{100 * e['acc']:.2f}%" if "acc" in e else f"val {100 * e['val_acc']:.2f}%"
            cells.append(figure + where)
        cells = [f"{c:>22}" for c in cells] + [f"{100 * r[sec][key]:.2f}%".rjust(11) if sec in r else f"{'-':>11}"
                                                for _, sec, key in extra]
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)
