"""Small image-text corpora built from Fashion-MNIST, in the on-disk formats real corpora use:

- captions:    WebDataset shards KEY.png + KEY.txt + KEY.json (CC3M/LAION style), one sample per
               Fashion-MNIST image; the caption names the class (with synonyms, in varied wording)
               and instance attributes measured on the pixels (dark/light, small/large, narrow/wide).
- scenes:      56x56 canvases holding two items (left/right or top/bottom), captioned with what is
               where, so that matching a caption needs the instance and its place, not the class.
- interleaved: MMC4-style JSONL documents (text_list + image_info with matched_text_index) and
               their image shards: catalogue pages where the text before an image describes it and
               the text after continues.

Everything is a deterministic function of (kind, split, n, seed). Train/test corpora use only
Fashion-MNIST's train/test images. `ensure_corpus` builds a corpus into a cache on first use;
its manifest.json is written last, so a half-built corpus is rebuilt. A folder imagelm builds
holds a marker file (MARKER): a folder without one is never deleted or overwritten."""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from imagelm.data.sources import ImageData, fashion_mnist
from imagelm.data.webdataset import ReadStats, ShardWriter, iter_samples
from imagelm.errors import DataError, DatasetMissing

log = logging.getLogger(__name__)

VERSION = 1               # bump when builders change what they write: cached corpora are rebuilt
KINDS = ("captions", "scenes", "interleaved")
DEFAULT_N = {"captions": {"train": None, "test": None}, "scenes": {"train": 20000, "test": 2000},
             "interleaved": {"train": 10000, "test": 1000}}     # None: every image of the split
SCENE_SIZE = 56
INK = 25                  # a pixel above this is part of the item (Fashion-MNIST's background is 0)

# Synonyms never shared between classes, so a caption still names exactly one class.
SYNONYMS = {
    "t-shirt": ["t-shirt", "tee", "t-shirt top", "short-sleeved top"],
    "trouser": ["trousers", "pants", "slacks"],
    "pullover": ["pullover", "sweater", "jumper"],
    "dress": ["dress", "gown", "frock"],
    "coat": ["coat", "jacket", "overcoat"],
    "sandal": ["sandal", "strappy sandal", "summer sandal"],
    "shirt": ["shirt", "blouse", "button-up shirt"],
    "sneaker": ["sneaker", "trainer", "running shoe"],
    "bag": ["bag", "handbag", "purse"],
    "ankle boot": ["ankle boot", "boot", "short boot"],
}
PLURAL = {"trousers", "pants", "slacks"}        # "a pair of ..." rather than "a ..."
GROUP = {"t-shirt": "clothes", "trouser": "clothes", "pullover": "clothes", "dress": "clothes",
         "coat": "clothes", "shirt": "clothes", "sandal": "shoes", "sneaker": "shoes",
         "ankle boot": "shoes", "bag": "bags"}
# attribute -> (word below the class's lower tertile, word above its upper tertile)
ATTRIBUTES = {"size": ("small", "large"), "brightness": ("dark", "light"), "width": ("narrow", "wide")}

CAPTION_TEMPLATES = [
    "a photo of {np}.", "a picture of {np}.", "{np} on a black background.", "a product photo of {np}.",
    "a greyscale image of {np}.", "this is {np}.", "catalogue image: {np}.", "a low-resolution photo of {np}.",
    "here we see {np}.", "{np}, shown from the front.",
]
SCENE_TEMPLATES = {
    "horizontal": ["{0} on the left and {1} on the right.", "{1} on the right and {0} on the left.",
                   "on the left, {0}; on the right, {1}.", "{0} to the left of {1}.", "{1} to the right of {0}.",
                   "two items: {0} on the left, {1} on the right."],
    "vertical": ["{0} at the top and {1} at the bottom.", "{1} at the bottom and {0} at the top.",
                 "at the top, {0}; at the bottom, {1}.", "{0} above {1}.", "{1} below {0}.",
                 "two items: {0} at the top, {1} at the bottom."],
}
POSITIONS = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}


# ----------------------------------------------------------------------------- attributes

def pixel_stats(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, 3) float: [ink area fraction, mean ink intensity, bounding-box
    width / height], the quantities the attribute words describe."""
    x = images.numpy().mean(1) if images.shape[1] > 1 else images.numpy()[:, 0]      # (N, H, W)
    ink = x > INK
    count = ink.sum((1, 2))
    area = count / (x.shape[1] * x.shape[2])
    intensity = np.where(ink, x, 0).sum((1, 2), dtype=np.float64) / np.maximum(count, 1)

    def extent(m: np.ndarray) -> np.ndarray:                       # (N, L) bool -> (N,) occupied span
        first, last = m.argmax(1), m.shape[1] - 1 - m[:, ::-1].argmax(1)
        return np.where(m.any(1), last - first + 1, 0)

    aspect = extent(ink.any(1)) / np.maximum(extent(ink.any(2)), 1)
    return torch.from_numpy(np.stack([area, intensity, aspect], 1)).float()


def attribute_thresholds(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, 3, 2): per class and statistic, the lower and upper tertile. Words are relative to the
    class: a 'wide' sneaker is wide for a sneaker. Only the outer thirds get a word."""
    s = pixel_stats(images)
    q = torch.tensor([1 / 3, 2 / 3])
    out = torch.zeros(num_classes, 3, 2)
    for c in range(num_classes):
        m = labels == c
        if m.any():
            out[c] = torch.quantile(s[m], q, dim=0).T
    return out


def instance_attributes(images: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> list[dict]:
    """Attribute words for each image: {"size": "small"|"large"|None, "brightness": ..., "width": ...}."""
    s = pixel_stats(images)                                      # (N, 3)
    th = thresholds[labels]                                      # (N, 3, 2)
    low, high = (s < th[..., 0]).tolist(), (s > th[..., 1]).tolist()
    return [{name: (words[0] if lo[j] else words[1] if hi[j] else None)
             for j, (name, words) in enumerate(ATTRIBUTES.items())} for lo, hi in zip(low, high)]


def noun_phrase(noun: str, adjectives: Sequence[str] = ()) -> str:
    words = " ".join([*adjectives, noun])
    if noun in PLURAL:
        return f"a pair of {words}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def _words(attrs: dict, rng: random.Random, keep: float) -> list[str]:
    return [w for w in attrs.values() if w is not None and rng.random() < keep]


def caption(class_name: str, attrs: dict, rng: random.Random) -> str:
    """One caption: a template, a synonym, and the attribute words (most of them), either as
    adjectives or as a second sentence."""
    noun = rng.choice(SYNONYMS.get(class_name, [class_name]))
    adjs = _words(attrs, rng, keep=0.85)
    template = rng.choice(CAPTION_TEMPLATES)
    if adjs and rng.random() < 0.3:
        tail = adjs[0] if len(adjs) == 1 else ", ".join(adjs[:-1]) + " and " + adjs[-1]
        return template.format(np=noun_phrase(noun)) + f" it is {tail}."
    return template.format(np=noun_phrase(noun, adjs))


def scene_caption(items: Sequence[dict], layout: str, rng: random.Random) -> str:
    """items in position order (left, right) or (top, bottom), each {"class", "attributes"}. With
    two items of one class every attribute word is kept, since only they tell them apart."""
    same = len({it["class"] for it in items}) == 1
    nps = [noun_phrase(rng.choice(SYNONYMS.get(it["class"], [it["class"]])),
                       _words(it["attributes"], rng, keep=1.0 if same else 0.5)) for it in items]
    return rng.choice(SCENE_TEMPLATES[layout]).format(*nps)


# ----------------------------------------------------------------------------- building

def _source(split: str, root: str, data: ImageData | None) -> tuple[ImageData, torch.Tensor]:
    """The split's images and the attribute thresholds, measured on the train split so that
    'dark' means the same in train and test captions (on `data` itself when it is given)."""
    if data is not None:
        return data, attribute_thresholds(data.images, data.labels, len(data.classes))
    data = fashion_mnist(split, root)
    ref = data if split == "train" else fashion_mnist("train", root)
    return data, attribute_thresholds(ref.images, ref.labels, len(ref.classes))


MARKER = ".imagelm-corpus"     # in every folder imagelm builds a corpus in: the only ones it may delete


def _read_manifest(out: Path) -> dict | None:
    try:
        m = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("shards"), list) else None


def _built_here(out: Path) -> bool:
    """Whether imagelm built the corpus in `out` (its marker, or a manifest of a build before markers)."""
    m = _read_manifest(out) or {}
    return (out / MARKER).exists() or (m.get("kind") in KINDS and "version" in m and "requested_n" in m)


def _refuse_foreign(out: Path, why: str) -> None:
    """DataError unless `out` is absent, empty, or a corpus imagelm built."""
    if out.is_dir() and any(out.iterdir()) and not _built_here(out):
        raise DataError(f"{out} {why}, and imagelm did not build it (no {MARKER}): imagelm never deletes or "
                        f"overwrites a folder it did not create. To read your own shards there, write a "
                        f"manifest.json listing them ({{\"shards\": [\"00000.tar\", ...]}}); to have imagelm build "
                        f"a corpus, point it at an empty or new folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a corpus folder")


def _prepare(out: Path, prefixes: Sequence[str]) -> None:
    """Remove what an earlier build of this corpus left (manifest first: the dir is not complete).
    The builders have refused a folder imagelm did not build (_refuse_foreign) before this."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("built by imagelm: it may delete and rebuild this folder\n")
    (out / "manifest.json").unlink(missing_ok=True)
    for p in prefixes:
        for f in out.glob(f"{p}-*.tar"):
            f.unlink()
    (out / "docs.jsonl").unlink(missing_ok=True)


def _finish(out: Path, kind: str, split: str, n: int, requested: int | None, seed: int, w: ShardWriter, t0: float,
            **extra) -> dict:
    """manifest.json, written last: its presence says the corpus is complete."""
    manifest = {"kind": kind, "split": split, "n": n, "requested_n": requested, "seed": seed, "version": VERSION,
                "samples": w.count, "shards": [p.name for p in w.shards], "counts": w.counts, **extra,
                "seconds": time.time() - t0}
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


def build_captions(out: str | Path, split: str = "train", n: int | None = None, seed: int = 0, root: str = "",
                   maxcount: int = 1000, data: ImageData | None = None) -> dict:
    """One sample per image (the first n, all by default): KEY.png (1, 28, 28), KEY.txt caption,
    KEY.json {"label", "class", "attributes"}. Returns the manifest."""
    t0, out, requested = time.time(), Path(out), n
    _refuse_foreign(out, "holds files")          # before any work
    data, th = _source(split, root, data)
    n = len(data) if n is None else min(n, len(data))
    images, labels = data.images[:n], data.labels[:n]
    attrs = instance_attributes(images, labels, th)
    rng = random.Random(f"captions-{split}-{seed}")
    _prepare(out, ["captions"])
    with ShardWriter(out, "captions", maxcount) as w:
        for i in range(n):
            name = data.classes[int(labels[i])]
            w.write({"__key__": f"{i:06d}", "png": images[i], "txt": caption(name, attrs[i], rng),
                     "json": {"label": int(labels[i]), "class": name, "attributes": attrs[i]}})
    return _finish(out, "captions", split, n, requested, seed, w, t0)


def build_scenes(out: str | Path, split: str = "train", n: int | None = None, seed: int = 0, root: str = "",
                 maxcount: int = 1000, data: ImageData | None = None) -> dict:
    """n canvases of SCENE_SIZE^2 with two items side by side (left/right) or stacked (top/bottom),
    each jittered a few pixels; items of the same class in 1 scene of 10. KEY.json holds
    {"layout", "items": [{"label", "class", "position", "box": [x, y, w, h], "index",
    "attributes"}]} with items in position order; "index" is the item's image in the split."""
    t0, out = time.time(), Path(out)
    _refuse_foreign(out, "holds files")          # before any work
    data, th = _source(split, root, data)
    n = DEFAULT_N["scenes"].get(split, 1000) if n is None else n
    rng = random.Random(f"scenes-{split}-{seed}")
    by_class = [torch.nonzero(data.labels == c).flatten().tolist() for c in range(len(data.classes))]
    present = [c for c in range(len(data.classes)) if by_class[c]]
    c_in, h, w_ = data.images.shape[1:]
    pixels = data.images.numpy()                                  # numpy: per-scene torch ops cost more than the work
    attrs = instance_attributes(data.images, data.labels, th)
    _prepare(out, ["scenes"])
    with ShardWriter(out, "scenes", maxcount) as w:
        for i in range(n):
            layout = rng.choice(("horizontal", "vertical"))
            a = rng.choice(present)
            b = a if rng.random() < 0.1 or len(present) == 1 else rng.choice([c for c in present if c != a])
            idx = rng.sample(by_class[a], 2) if a == b and len(by_class[a]) > 1 else \
                [rng.choice(by_class[a]), rng.choice(by_class[b])]
            canvas = np.zeros((c_in, SCENE_SIZE, SCENE_SIZE), dtype=np.uint8)          # (C, 56, 56)
            span = w_ if layout == "horizontal" else h
            items = []
            for slot, (pos, j) in enumerate(zip(POSITIONS[layout], idx)):
                along = rng.randint(0, 2) if slot == 0 else SCENE_SIZE - span - rng.randint(0, 2)
                x, y = (along, rng.randint(0, SCENE_SIZE - h)) if layout == "horizontal" else \
                    (rng.randint(0, SCENE_SIZE - w_), along)
                region = canvas[:, y:y + h, x:x + w_]
                np.maximum(region, pixels[j], out=region)            # max: a small overlap keeps both items
                label = int(data.labels[j])
                items.append({"label": label, "class": data.classes[label], "position": pos, "box": [x, y, w_, h],
                              "index": j, "attributes": attrs[j]})
            w.write({"__key__": f"{i:06d}", "png": canvas, "txt": scene_caption(items, layout, rng),
                     "json": {"layout": layout, "items": items}})
    return _finish(out, "scenes", split, n, n, seed, w, t0)


TITLES = ["{season} catalogue, page {page}.", "new arrivals this week.", "staff picks.", "our {season} range.",
          "clearance sale: everything must go.", "the {season} lookbook."]
SEASONS = ["spring", "summer", "autumn", "winter"]
BEFORE = ["next up: {np}.", "below is {np}.", "take a look at {np}.", "we also stock {np}.",
          "here is {np} from our {season} range.", "customers love {np}."]
FIRST = ["pictured: {np}.", "above: {np}.", "shown here is {np}."]        # for an image that opens a document
CARE = {"clothes": ["machine wash at 30 degrees.", "tumble dry on low.", "iron on a low setting.",
                    "sizes run from xs to xl."],
        "shoes": ["wipe clean with a damp cloth.", "half sizes are available.", "the sole is rubber.",
                  "they come in a shoe box."],
        "bags": ["it has an inner zip pocket.", "the strap is adjustable.", "it fits a laptop.",
                 "wipe clean with a damp cloth."]}
PRICE = {"clothes": 25, "shoes": 45, "bags": 35}
CONTEXT = ["it pairs well with {other}.", "back in stock soon.", "free delivery on orders over $50.",
           "a best seller last {season}.", "order before noon for next-day delivery."]


def _document(doc_id: str, d: int, idx: list[int], data: ImageData, attrs: list[dict], rng: random.Random) -> dict:
    """One catalogue page. Image j sits just before text_list[matched_text_index] (the way
    OpenFlamingo reads MMC4): the segment before it describes the item (class + attributes), the
    segment at its index continues (care, price, context). A document may open with an image."""
    season = rng.choice(SEASONS)
    texts: list[str] = []
    info = []
    image_first = rng.random() < 0.25
    if not image_first and rng.random() < 0.5:
        texts.append(rng.choice(TITLES).format(season=season, page=rng.randint(1, 40)))
    for j, (i, at) in enumerate(zip(idx, attrs)):
        label = int(data.labels[i])
        name = data.classes[label]
        group = GROUP.get(name, "clothes")
        np_ = noun_phrase(rng.choice(SYNONYMS.get(name, [name])), _words(at, rng, keep=0.85))
        opens = image_first and j == 0
        if not opens:
            texts.append(rng.choice(BEFORE).format(np=np_, season=season))
        info.append({"image_name": f"{d:06d}_{j}.png", "matched_text_index": len(texts), "label": label,
                     "class": name, "attributes": at, "index": i})
        other = noun_phrase(rng.choice(SYNONYMS[rng.choice(list(SYNONYMS))]))
        after = [rng.choice(CARE[group]), f"yours for ${PRICE[group] + rng.randint(0, 30)}.",
                 rng.choice(CONTEXT).format(other=other, season=season)]
        rng.shuffle(after)
        texts.append(" ".join(([rng.choice(FIRST).format(np=np_)] if opens else []) + after[:rng.randint(1, 3)]))
    return {"doc_id": doc_id, "text_list": texts, "image_info": info}


def build_interleaved(out: str | Path, split: str = "train", n: int | None = None, seed: int = 0, root: str = "",
                      maxcount: int = 1000, data: ImageData | None = None) -> dict:
    """n documents with 1-4 images each: docs.jsonl (one MMC4-style document a line) and
    images-NNNNNN.tar shards whose members are the documents' image_name (KEY.png)."""
    t0, out = time.time(), Path(out)
    _refuse_foreign(out, "holds files")          # before any work
    data, th = _source(split, root, data)
    n = DEFAULT_N["interleaved"].get(split, 1000) if n is None else n
    rng = random.Random(f"interleaved-{split}-{seed}")
    counts = [rng.randint(1, 4) for _ in range(n)]
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    order = perm.repeat(sum(counts) // len(data) + 1)[:sum(counts)].tolist()   # each image once per pass
    attrs = instance_attributes(data.images[order], data.labels[order], th)
    _prepare(out, ["images"])
    tmp = out / ".docs.jsonl.tmp"
    with ShardWriter(out, "images", maxcount) as w, open(tmp, "w") as f:
        k = 0
        for d, c in enumerate(counts):
            doc = _document(f"fmnist-{split}-{d:06d}", d, order[k:k + c], data, attrs[k:k + c], rng)
            k += c
            f.write(json.dumps(doc) + "\n")
            for im in doc["image_info"]:
                w.write({"__key__": im["image_name"].rsplit(".", 1)[0], "png": data.images[im["index"]]})
    os.replace(tmp, out / "docs.jsonl")
    return _finish(out, "interleaved", split, n, n, seed, w, t0, documents=n, jsonl="docs.jsonl")


BUILDERS: dict[str, Callable[..., dict]] = {"captions": build_captions, "scenes": build_scenes,
                                            "interleaved": build_interleaved}


# ----------------------------------------------------------------------------- cache

def default_root() -> Path:
    """$IMAGELM_CORPORA, else $XDG_CACHE_HOME/imagelm/corpora (~/.cache/imagelm/corpora)."""
    if os.environ.get("IMAGELM_CORPORA"):
        return Path(os.environ["IMAGELM_CORPORA"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagelm" / "corpora"


@dataclass
class Corpus:
    dir: Path
    shards: list[str]                  # WebDataset shard paths, in order
    jsonl: str | None                  # interleaved documents (None for captions/scenes)
    manifest: dict


def _corpus(out: Path, manifest: dict) -> Corpus:
    jsonl = str(out / manifest["jsonl"]) if manifest.get("jsonl") else None
    return Corpus(out, [str(out / s) for s in manifest["shards"]], jsonl, manifest)


def ensure_corpus(kind: str, split: str, root: str | Path | None = None, n: int | None = None, seed: int = 0,
                  source_root: str = "") -> Corpus:
    """The corpus ROOT/KIND/SPLIT, built first if it is missing, half-built, or was built with
    another n, seed or builder version. Under DDP call it on rank 0, then barrier, then on all."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown corpus kind {kind!r}; expected one of {', '.join(KINDS)}")
    out = Path(root or default_root()) / kind / split
    want_n = n if n is not None else DEFAULT_N[kind].get(split)
    m = _read_manifest(out)
    if m is not None and all(isinstance(s, str) and (out / s).is_file() for s in m["shards"]) and \
            (kind != "interleaved" or isinstance(m.get("jsonl"), str) and (out / m["jsonl"]).is_file()):
        if not _built_here(out) or (m.get("version") == VERSION and m.get("seed") == seed and
                                    m.get("requested_n") == want_n):
            return _corpus(out, m)                  # the user's own corpus is read as it is
    _refuse_foreign(out, "has no complete manifest.json (one naming its shards, all present)")
    log.info("building the %s %s corpus in %s", kind, split, out)
    if out.exists():
        shutil.rmtree(out)
    return _corpus(out, BUILDERS[kind](out, split, n=want_n, seed=seed, root=source_root))


def mismatched_caption(scene: dict, classes: Sequence[str], rng: random.Random) -> str:
    """A hard negative for a scene (its KEY.json): a caption in the same words that is wrong about
    it: the two items swapped, or one of them said to be another class (when both items are of
    one class a swap would still be true, so a class changes)."""
    items = [dict(it) for it in scene["items"]]
    if items[0]["class"] != items[1]["class"] and rng.random() < 0.5:
        items.reverse()
    else:
        k = rng.randrange(2)
        items[k]["class"] = rng.choice([c for c in classes if c not in {it["class"] for it in items}])
    return scene_caption(items, scene["layout"], rng)


# ----------------------------------------------------------------------------- reading back

@dataclass
class ImageTextData:
    images: torch.Tensor               # (N, C, H, W) uint8
    captions: list[str]
    labels: torch.Tensor               # (N,) int64, -1 where a sample has no "label" (scenes, web data)
    meta: list[dict]                   # each sample's json ({} where it has none)
    keys: list[str]
    skipped: int = 0                   # undecodable samples left out

    def __len__(self) -> int:
        return len(self.images)


def load_image_text(urls: str | Path | Sequence[str | Path], strict: bool = False) -> ImageTextData:
    """A whole captions/scenes split in memory (these corpora are small): every sample with an
    image and a caption, in shard order."""
    stats = ReadStats()
    images, captions, labels, meta, keys = [], [], [], [], []
    for s in iter_samples(urls, strict=strict, stats=stats):
        img = next((s[k] for k in ("png", "jpg", "jpeg", "webp") if k in s), None)
        text = s.get("txt")
        if img is None or text is None:
            stats.skipped += 1                               # an image without caption, or the reverse
            continue
        j = s.get("json") if isinstance(s.get("json"), dict) else {}
        images.append(img)
        captions.append(text)
        labels.append(int(j.get("label", -1)))
        meta.append(j)
        keys.append(s["__key__"])
    if not images:
        raise FileNotFoundError(f"no image-text samples in {urls}")
    return ImageTextData(torch.stack(common_shape(images)), captions, torch.tensor(labels), meta, keys, stats.skipped)


def common_shape(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """(C, H, W) uint8 images in the most frequent shape: the others converted (grey <-> RGB) and
    resized one by one, with a warning and a count, rather than the whole corpus refused."""
    from collections import Counter

    (C, H, W), _ = Counter(tuple(x.shape) for x in images).most_common(1)[0]
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)       # ITU-R 601 luma, as Pillow's convert("L")
    out, changed = [], 0
    for x in images:
        if tuple(x.shape) != (C, H, W):
            changed += 1
            if x.shape[0] != C:
                x = x.expand(3, -1, -1) if C == 3 else (x[:3].float() * weights).sum(0, keepdim=True).round().to(
                    torch.uint8)
            if x.shape[-2:] != (H, W):
                x = torch.nn.functional.interpolate(x[None].float(), size=(H, W), mode="bilinear", antialias=True)
                x = x[0].round().clamp(0, 255).to(torch.uint8)
        out.append(x.contiguous())
    if changed:
        log.warning("%d of %d images were not %dx%dx%d: converted and resized to it", changed, len(images), C, H, W)
    return out


@dataclass
class Document:
    doc_id: str
    texts: list[str]
    images: list[torch.Tensor]         # each (C, H, W) uint8
    positions: list[int]               # images[i] sits just before texts[positions[i]]
    meta: list[dict] = field(default_factory=list)   # each image's image_info entry

    def interleave(self) -> list[str | torch.Tensor]:
        """Text segments and images in reading order."""
        out: list[str | torch.Tensor] = []
        by_pos: dict[int, list[torch.Tensor]] = {}
        for p, im in zip(self.positions, self.images):
            by_pos.setdefault(p, []).append(im)
        for i, t in enumerate(self.texts):
            out.extend(by_pos.pop(i, []))
            out.append(t)
        for p in sorted(by_pos):                             # an index past the last text: images at the end
            out.extend(by_pos[p])
        return out


@dataclass
class InterleavedData:
    docs: list[Document]
    missing_images: int = 0            # image_info entries whose image was absent or undecodable
    bad_lines: dict[str, int] = field(default_factory=dict)   # JSONL lines left out, by reason


def _document_problem(d) -> str | None:
    """Why a parsed JSONL line is not an MMC4-style document, or None."""
    if not isinstance(d, dict):
        return "not a JSON object"
    texts = d.get("text_list")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return "text_list missing or not a list of strings"
    info = d.get("image_info", [])
    if not isinstance(info, list):
        return "image_info not a list"
    for im in info:
        if not isinstance(im, dict) or not isinstance(im.get("image_name"), str) or not im["image_name"]:
            return "image_info entry without an image_name"
        i = im.get("matched_text_index")
        if not isinstance(i, int) or isinstance(i, bool):
            return "matched_text_index missing or not an integer"
        if not 0 <= i <= len(texts):
            return "matched_text_index out of range"
    return None


def read_documents(jsonl: str | Path, strict: bool = False, bad: collections.Counter | None = None) -> Iterator[dict]:
    """The valid documents of an MMC4-style JSONL file. A line that is not UTF-8, not JSON, or not
    a document (see _document_problem) is skipped and counted in `bad` by reason, or under strict
    raises DataError naming file:line."""
    bad = bad if bad is not None else collections.Counter()
    with open(jsonl, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw.decode("utf-8"))
                why = _document_problem(d)
            except UnicodeDecodeError:
                why = "not UTF-8"
            except ValueError:
                why = "invalid JSON"
            if why is None:
                yield d
                continue
            if strict:
                raise DataError(f"{jsonl}:{lineno}: {why} (data.strict=true; false skips such lines and counts them)")
            bad[why] += 1


def _summarise(jsonl, bad: collections.Counter) -> None:
    if bad:
        log.warning("skipped %d lines of %s: %s", sum(bad.values()), jsonl,
                    ", ".join(f"{n} {why}" for why, n in bad.most_common()))


def load_interleaved(jsonl: str | Path, shards: str | Path | Sequence[str | Path],
                     strict: bool = False) -> InterleavedData:
    """MMC4-style documents with their images placed. An image missing from the shards (common
    in real MMC4 downloads) is dropped from its document and counted; under strict it raises."""
    stats = ReadStats()
    pool = {os.path.basename(s["__key__"]): s["png"] for s in iter_samples(shards, strict=strict, stats=stats)
            if "png" in s}
    docs, missing, bad = [], stats.skipped, collections.Counter()
    for d in read_documents(jsonl, strict, bad):
        images, positions, meta = [], [], []
        for im in d.get("image_info", []):
            key = os.path.basename(im["image_name"]).rsplit(".", 1)[0]
            if key not in pool:
                if strict:
                    raise DataError(f"image {im['image_name']} of document {d.get('doc_id')} in {jsonl} is not in "
                                    f"the shards")
                missing += 1
                continue
            images.append(pool[key])
            positions.append(im["matched_text_index"])
            meta.append(im)
        docs.append(Document(str(d.get("doc_id", len(docs))), list(d["text_list"]), images, positions, meta))
    _summarise(jsonl, bad)
    if not docs:
        raise DatasetMissing(f"no valid document in {jsonl}" + (f" ({sum(bad.values())} bad lines)" if bad else ""))
    return InterleavedData(docs, missing, dict(bad))


def document_texts(split: str, root: str | Path | None = None, n: int | None = None, seed: int = 0,
                   limit: int = 0) -> list[str]:
    """The text of interleaved documents (each one's segments in order, images left out): a
    text-only corpus read from the JSONL alone; `limit`: about that many documents spread over the
    file (read by byte offset), not all of it."""
    from imagelm.data.documents import line_starts, parse

    c = ensure_corpus("interleaved", split, root, n, seed)
    starts = line_starts(c.jsonl)
    if limit and limit < len(starts):
        starts = starts[np.linspace(0, len(starts) - 1, limit).round().astype(np.int64)]
    texts, bad = [], collections.Counter()
    with open(c.jsonl, "rb") as f:
        for s in starts.tolist():
            f.seek(s)
            d, why = parse(f.readline())
            if d is None:
                bad[why] += 1
            else:
                texts.append(" ".join(d["text_list"]))
    _summarise(c.jsonl, bad)
    return texts


def load_corpus(kind: str, split: str, root: str | Path | None = None, n: int | None = None,
                seed: int = 0, strict: bool = False) -> ImageTextData | InterleavedData:
    """ensure_corpus + load: what a recipe calls."""
    c = ensure_corpus(kind, split, root, n, seed)
    if kind == "interleaved":
        return load_interleaved(c.jsonl, c.shards, strict)
    return load_image_text(c.shards, strict)

