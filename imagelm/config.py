"""Typed configs: dataclasses whose defaults are the papers' values, YAML recipes, dotted overrides.

A recipe is a YAML file with the sections below plus one section named after the method
(`aim:` for AIM) whose dataclass the method registers. Every key is checked before any work
starts: a misspelt key or a bad value raises ConfigError naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

RECIPES = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    """The ViT backbone shared by every method (defaults: AIM-0.6B at 224 px)."""
    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    dim: int = 1536
    depth: int = 24
    heads: int = 12
    mlp_ratio: float = 4.0
    bias: bool = False          # AIM drops biases
    norm_eps: float = 1e-6


@dataclass
class DataConfig:
    dataset: Literal["fashion-mnist", "folder", "synthetic", "captions", "scenes", "captions+scenes",
                     "interleaved"] = "fashion-mnist"
    root: str = ""              # "" = the dataset's default location (corpora: ~/.cache/imagelm/corpora)
    resize: bool = False        # resize images to model.img_size (else a size mismatch is an error)
    corpus_size: int = 0        # samples per split of a built corpus (0 = its default: every image)
    crop_scale: tuple[float, float] = (0.4, 1.0)   # RandomResizedCrop scale (AIM)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    flip: bool = True
    strict: bool = False        # fail on an unreadable image instead of skipping it


@dataclass
class TrainConfig:
    batch_size: int = 4096      # global batch, all ranks and accumulation steps together
    accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup: float = 0.025       # fraction of the steps
    epochs: float = 800.0
    steps: int = 0              # 0 = derived from epochs
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    ckpt_every: int = 1000      # steps
    keep_ckpts: int = 2
    log_every: int = 10
    seed: int = 0


@dataclass
class EvalConfig:
    batch_size: int = 1024      # feature extraction (inference mode, bf16; on CPU in chunks of ~4096 tokens)
    linear_iters: int = 300     # L-BFGS steps per fit of the linear probe's L2 path (see eval/probe.py)
    linear_wd: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5, 0.0)   # L2 strengths, chosen on val
    select_images: int = 10000  # fit images to rank layers / attentive lrs by (0 = all); the chosen one gets all
    attentive_layers: str = "last:6"   # blocks averaged for the attentive probe: "last:N" or "1,2,3" (AIM: last 6)
    attentive_epochs: int = 10
    attentive_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)   # the attentive probe's lr, chosen on val
    attentive_heads: int = 8
    knn_k: int = 20
    knn_t: float = 0.07
    val_size: int = 5000        # train images held out (at most 20%) to make every probe choice on
    seed: int = 0               # the fit/val split
    dataset: Literal["", "fashion-mnist", "folder", "synthetic"] = ""   # labelled probe data, if not the training data
    finetune_epochs: float = 3.0   # `imagelm eval --finetune`: end-to-end, linear head on pooled tokens
    finetune_lr: float = 3e-4
    finetune_batch: int = 128
    finetune_images: int = 10000   # labelled train images used (0 = all): the low-data regime by default
    finetune_gen_weight: float = 0.0   # > 0 keeps the pretraining loss (iGPT's joint objective)
    vl_steps: int = 300           # image-text fine-tunes: retrieval of a model without a joint space (BEiT-3), ITM
    vl_batch: int = 128
    vl_lr: float = 3e-4


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
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return str(value)
    return value


def build(cls, values: dict, where: str = ""):
    """Dataclass `cls` from a (nested) dict, checking every key and value."""
    if not isinstance(values, dict):
        raise ConfigError(f"'{where.rstrip('.')}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _bad_key(key, names, where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
    return cls(**kwargs)


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
    return yaml.safe_load(path.read_text()) or {}


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`a.b=value` strings applied to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{key}': '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return d


# keys that configs saved by older versions hold and this one no longer has
RETIRED = {"eval": ("linear_epochs",    # never read: the linear probe runs L-BFGS (eval.linear_iters)
                    "attentive_lr")}    # one lr, chosen on test: now eval.attentive_lrs, chosen on val


def drop_retired(d: dict) -> dict:
    """A saved run's config without its RETIRED keys, so that runs of older versions still load."""
    d = dict(d)
    for section, keys in RETIRED.items():
        if isinstance(d.get(section), dict):
            d[section] = {k: v for k, v in d[section].items() if k not in keys}
    return d


def from_dict(d: dict) -> Config:
    from imagelm.methods import METHODS  # late: methods import this module

    d = dict(d)
    method = d.pop("method", "aim")
    if method not in METHODS:
        near = difflib.get_close_matches(str(method), list(METHODS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown method '{method}'{hint}; methods: {', '.join(sorted(METHODS))}")
    objective = build(METHODS[method].Config, d.pop(method, {}) or {}, f"{method}.")
    sections = {f.name for f in dataclasses.fields(Config)} - {"method", "objective"}
    for key in d:
        if key not in sections:
            raise _bad_key(key, sorted(sections | {method, "method"}), "")
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
