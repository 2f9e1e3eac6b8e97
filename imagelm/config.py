"""Typed configs: dataclasses whose defaults are the papers' values, YAML recipes, dotted overrides.

A recipe is a YAML file with the sections below plus one section named after the method
(`aim:` for AIM) whose dataclass the method registers. Every key is checked before any work
starts: a misspelt key or a bad value raises ConfigError naming the key and what is allowed.
A field declares what its value must mean once, in its type: `Annotated[int, POSITIVE]`; rules
between fields of one section are its RULES.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal

import yaml

from imagelm.errors import ConfigError

RECIPES = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class Check:
    """A constraint on a field's value: `ok(value)` or the error says it `must` ..."""
    ok: Callable[[Any], bool]
    must: str


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
    return Check(lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi),
                 f"be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


POSITIVE = Check(lambda v: v > 0, "be > 0")
NON_NEGATIVE = Check(lambda v: v >= 0, "be >= 0")
RATIO = between(0, 1, lo_open=True, hi_open=True)          # a masking ratio: some but not all
FRACTION = between(0, 1)
CHANNELS = Check(lambda v: v in (1, 3), "be 1 (grey) or 3 (RGB)")
NON_EMPTY = Check(lambda v: len(v) > 0, "hold at least one value")
ORDERED = Check(lambda v: v[0] <= v[1], "be ordered [low, high]")
LAYERS = Check(lambda v: re.fullmatch(r"all|last:[1-9][0-9]*|[0-9]+(,[0-9]+)*", v) is not None,
               "be 'all', 'last:N' (N >= 1) or comma-separated layer numbers like 1,3,5")
BASELINES = ("random_init", "raw_pixels")   # eval's: the same encoder untrained; no encoder (standardised pixels)
Rule = tuple[Callable[[Any], bool], str]      # a rule between a section's fields; {w} in its words = "section."
Unit = Annotated[float, between(0, 1, lo_open=True)]       # (0, 1]
Beta = Annotated[float, between(0, 1, hi_open=True)]       # [0, 1)


@dataclass
class ModelConfig:
    """The ViT backbone shared by every method (defaults: AIM-0.6B at 224 px)."""
    img_size: Annotated[int, POSITIVE] = 224
    patch_size: Annotated[int, POSITIVE] = 14
    in_chans: Annotated[int, CHANNELS] = 3
    dim: Annotated[int, POSITIVE] = 1536
    depth: Annotated[int, POSITIVE] = 24
    heads: Annotated[int, POSITIVE] = 12
    mlp_ratio: Annotated[float, POSITIVE] = 4.0
    bias: bool = False          # AIM drops biases
    norm_eps: Annotated[float, POSITIVE] = 1e-6
    RULES: ClassVar[tuple[Rule, ...]] = (
        (lambda m: m.img_size % m.patch_size == 0, "{w}img_size must be a multiple of {w}patch_size"),
        (lambda m: m.dim % m.heads == 0, "{w}dim must be a multiple of {w}heads"),
    )


@dataclass
class DataConfig:
    dataset: Literal["fashion-mnist", "folder", "shards", "image-text", "synthetic", "captions", "scenes",
                     "captions+scenes", "interleaved"] = "fashion-mnist"
    root: str = ""              # "" = the dataset's default location (corpora: ~/.cache/imagelm/corpora);
                                # folder: ROOT/train/CLASS/*.jpg (+ ROOT/val or ROOT/test); shards, image-text
                                # (KEY.jpg|png|webp + KEY.txt caption): a folder of *.tar (or with train/ and val/
                                # or test/ subfolders), a brace pattern or glob
    resize: bool = False        # resize images to model.img_size (else a size mismatch is an error)
    corpus_size: Annotated[int, NON_NEGATIVE] = 0   # samples per split of a built corpus (0 = its default: every image)
    crop_scale: Annotated[tuple[Unit, Unit], ORDERED] = (0.4, 1.0)   # RandomResizedCrop scale (AIM)
    crop_ratio: Annotated[tuple[Annotated[float, POSITIVE], Annotated[float, POSITIVE]], ORDERED] = (0.75, 4 / 3)
    flip: bool = True
    strict: bool = False        # fail on an unreadable image instead of skipping it
    color_jitter: float = 0.0   # streamed data: brightness/contrast/saturation jitter strength (0 = off)
    workers: int = -1           # streamed data: decoding processes per rank (-1: from the CPU count, 0: none)
    prefetch: int = 2           # streamed data: batches each worker prepares ahead
    shuffle_buffer: int = 1000  # shards: samples (references, not pixels) held for shuffling, over all streams
    streams: Annotated[int, POSITIVE] = 64   # shards: the global batch is drawn from this many shard streams (at
                                # most one a shard, a divisor of the batch): fixed by the run, not by its ranks
                                # or workers, so any ranks x workers read the batches one process reads
    max_images: Annotated[int, POSITIVE] = 4   # interleaved: images a document keeps (its first; more are dropped)


@dataclass
class TrainConfig:
    batch_size: Annotated[int, POSITIVE] = 4096   # global batch, all ranks and accumulation steps together
    accum_steps: Annotated[int, POSITIVE] = 1
    lr: Annotated[float, POSITIVE] = 1e-3
    min_lr: Annotated[float, NON_NEGATIVE] = 0.0
    warmup: Annotated[float, FRACTION] = 0.025     # fraction of the steps
    epochs: Annotated[float, NON_NEGATIVE] = 800.0
    steps: Annotated[int, NON_NEGATIVE] = 0        # 0 = derived from epochs
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.05
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0   # 0 = off
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"     # under torchrun: replicate (ddp) or shard per block (fsdp)
    activation_checkpointing: bool = False       # recompute each block's activations in backward
    compile: bool = False
    ckpt_every: Annotated[int, POSITIVE] = 1000    # steps
    keep_ckpts: Annotated[int, POSITIVE] = 2
    log_every: Annotated[int, POSITIVE] = 10
    seed: Annotated[int, NON_NEGATIVE] = 0
    RULES: ClassVar[tuple[Rule, ...]] = (
        (lambda t: t.steps > 0 or t.epochs > 0, "{w}steps or {w}epochs must be > 0"),
        (lambda t: t.batch_size % t.accum_steps == 0, "{w}batch_size must be a multiple of {w}accum_steps"),
        (lambda t: t.min_lr <= t.lr, "{w}min_lr must not exceed {w}lr"),
    )


@dataclass
class EvalConfig:
    batch_size: Annotated[int, POSITIVE] = 1024   # feature extraction (inference, bf16; CPU: chunks of ~4096 tokens)
    linear_iters: Annotated[int, POSITIVE] = 300  # L-BFGS steps per fit of the linear probe's L2 path (eval/probe.py)
    linear_wd: Annotated[tuple[Annotated[float, NON_NEGATIVE], ...], NON_EMPTY] = (1e-2, 1e-3, 1e-4, 1e-5, 0.0)
                                # L2 strengths (for a fit on all fit images), chosen on val
    select_images: Annotated[int, NON_NEGATIVE] = 10000   # fit images the linear probe ranks layers by (0 = all)
    attentive_layers: Annotated[str, LAYERS] = "last:6"   # blocks averaged for the attentive probe (AIM: last 6)
    attentive_epochs: Annotated[int, POSITIVE] = 10
    attentive_lrs: Annotated[tuple[Annotated[float, POSITIVE], ...], NON_EMPTY] = (3e-3, 1e-2, 3e-2)
                                # the attentive probe's lr, chosen on val
    attentive_heads: Annotated[int, POSITIVE] = 8
    knn_k: Annotated[int, POSITIVE] = 20
    knn_t: Annotated[float, POSITIVE] = 0.07
    val_size: Annotated[int, POSITIVE] = 5000     # train images held out (at most 20%) to make every probe choice on
    seed: int = 0               # the fit/val split
    dataset: Literal["", "fashion-mnist", "folder", "synthetic"] = ""   # labelled probe data, if not the training data
    finetune_epochs: Annotated[float, POSITIVE] = 3.0   # `imagelm eval --finetune`: end to end, linear head
    finetune_lr: Annotated[float, POSITIVE] = 3e-4
    finetune_batch: Annotated[int, POSITIVE] = 128
    finetune_images: Annotated[int, NON_NEGATIVE] = 10000   # labelled train images used (0 = all): low-data by default
    finetune_gen_weight: Annotated[float, NON_NEGATIVE] = 0.0   # > 0 keeps the pretraining loss (iGPT's joint aim)
    vl_steps: Annotated[int, POSITIVE] = 300      # image-text fine-tunes: retrieval without a joint space (BEiT-3), ITM
    vl_batch: Annotated[int, POSITIVE] = 128
    vl_lr: Annotated[float, POSITIVE] = 3e-4


@dataclass
class Config:
    method: str = "aim"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: Any = None       # the method's own dataclass, under the YAML key named after it

    def to_dict(self) -> dict:
        d = {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "objective"}
        d[self.method] = to_plain(self.objective)
        return d


def to_plain(x):
    if dataclasses.is_dataclass(x):
        return {f.name: to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, tuple):
        return list(x)
    return x


def _bad_key(key: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean '{where}{near[0]}'?)" if near else ""
    return ConfigError(f"unknown config key '{where}{key}'{hint}; valid keys here: {', '.join(sorted(valid))}")


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is Annotated:
        tp, *checks = typing.get_args(tp)
        value = _coerce(value, tp, key)
        for c in checks:
            if isinstance(c, Check) and not c.ok(value):
                raise ConfigError(f"bad value {_show(value)} for '{key}': it must {c.must}")
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"bad value {value!r} for '{key}'; allowed: {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"'{key}' must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):   # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"'{key}' must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return str(value)
    return value


def _show(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)


def check(obj, where: str = "") -> None:
    """Every field constraint and rule of a (nested) config dataclass, defaults included."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{where}{f.name}.")
        elif f.name in hints:
            _coerce(value, hints[f.name], f"{where}{f.name}")
    for ok, says in getattr(type(obj), "RULES", ()):
        if not ok(obj):
            says = says.format(w=where)
            got = ", ".join(f"{where}{f.name}={_show(getattr(obj, f.name))}" for f in dataclasses.fields(obj)
                            if re.search(rf"(?<![\w.]){re.escape(where + f.name)}\b", says))
            raise ConfigError(f"{says} (got {got})" if got else says)


def build(cls, values: dict, where: str = ""):
    """Dataclass `cls` from a (nested) dict, checking every key and value."""
    if not isinstance(values, dict):
        raise ConfigError(f"'{where.rstrip('.')}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _bad_key(str(key), names, where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
    obj = cls(**kwargs)
    check(obj, where)
    return obj


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.exists():
        near = difflib.get_close_matches(name_or_path, recipe_names(), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown recipe '{name_or_path}'{hint}; recipes: {', '.join(recipe_names())}")
    return read_yaml(path, "recipe")


def read_yaml(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (a recipe, a run's config.yaml); anything else is a
    ConfigError naming the file (binary, not YAML, a list, a folder)."""
    try:
        d = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file (not UTF-8): pass a YAML recipe") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a YAML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if d is None:
        raise ConfigError(f"{what} {path} is empty")
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {path} must be a YAML mapping of sections (model:, train:, ...), "
                          f"got a {type(d).__name__}")
    return d


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`a.b=value` strings applied to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        node = d
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': '{key}' is not a dotted key like train.lr")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{key}': '{p}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              f"quote strings, write lists as [a, b]") from None
    return d


# keys that configs saved by older versions hold and this one no longer has
RETIRED = {"eval": ("linear_epochs",    # never read: the linear probe runs L-BFGS (eval.linear_iters)
                    "attentive_lr"),    # one lr, chosen on test: now eval.attentive_lrs, chosen on val
           "beit3": ("seed",),          # the text-only stream's order: now drawn per step with the batch
           "lcl": ("seed",)}            # captions' image-first coin: now drawn per step with the batch


def drop_retired(d: dict) -> dict:
    """A saved run's config without its RETIRED keys, so that runs of older versions still load."""
    d = dict(d)
    for section, keys in RETIRED.items():
        if isinstance(d.get(section), dict):
            d[section] = {k: v for k, v in d[section].items() if k not in keys}
    return d


def from_dict(d: dict) -> Config:
    from imagelm.methods import METHODS  # late: methods import this module

    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of sections (model:, train:, ...), got {d!r:.60}")
    d = dict(d)
    method = d.pop("method", "aim")
    if not isinstance(method, str) or method not in METHODS:
        near = difflib.get_close_matches(str(method), list(METHODS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown method '{method}'{hint}; methods: {', '.join(sorted(METHODS))}")
    objective = build(METHODS[method].Config, d.pop(method, {}) or {}, f"{method}.")
    sections = {f.name for f in dataclasses.fields(Config)} - {"method", "objective"}
    for key in d:
        if key not in sections:
            raise _bad_key(str(key), sorted(sections | {method, "method"}), "")
    cfg = build(Config, d)
    cfg.method, cfg.objective = method, objective
    return cfg


def load(recipe: str, overrides: list[str] = ()) -> Config:
    return from_dict(apply_overrides(load_recipe(recipe), list(overrides)))


def diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
