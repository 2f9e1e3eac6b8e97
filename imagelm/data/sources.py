"""Image sources. In memory as uint8 tensors (ImageData): Fashion-MNIST (IDX files), synthetic
images for tests, small folders (`image_folder`), held-out image-text sets for eval
(`image_text`). Streamed from disk (`load` gives a FolderSet / ShardSet / InterleavedSet): image
folders (class = subfolder), WebDataset shards with or without captions (data.dataset=shards,
image-text, and the built corpora captions, scenes, captions+scenes), interleaved documents;
`in_memory` turns any into a bounded ImageData, `preview` into what a method's prepare() sees."""
from __future__ import annotations

import functools
import gzip
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imagelm.errors import DataError, DatasetMissing  # noqa: F401 - DatasetMissing: callers import it from here

log = logging.getLogger(__name__)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    images: torch.Tensor            # (N, C, H, W) uint8
    labels: torch.Tensor            # (N,) int64
    classes: list[str]
    skipped: int = 0                # unreadable files left out
    mean: list[float] = field(default_factory=list)   # per-channel statistics of the train split
    std: list[float] = field(default_factory=list)
    texts: list[str] | None = None  # a caption per image (image-text data)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)   # per-sample tensors the loader batches
                                    # with the images, e.g. tokenized captions (N, L) of an eval fine-tune
    corpus: dict | None = None      # a built corpus's {"root", "n"}: where a method finds its sibling corpora
    documents = None                # (prepare views of interleaved sets have them)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def images_per_sample(self) -> int:
        return self.images.shape[1] if self.images.dim() == 5 else 1


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {arr.size} bytes for shape {shape}")
    return arr.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise DatasetMissing(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, as root), or point data.root= at a "
        f"folder holding the four IDX files (train-images-idx3-ubyte.gz, ...).")


def fashion_mnist(split: str, root: str = "") -> ImageData:
    root_p = Path(root or FASHION_MNIST_ROOT)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(_find(root_p, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root_p, f"{prefix}-labels-idx1-ubyte"))
    return ImageData(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)),
                     list(FASHION_MNIST_CLASSES))


def image_folder(root: str, size: int, channels: int, strict: bool = False,
                 classes: list[str] | None = None) -> ImageData:
    """root/class_name/*.png decoded into memory with Pillow, resized to size x size (small
    folders; `data.dataset=folder` streams instead, see data/folder.py). Unreadable files are
    skipped and counted, or raise under strict; `classes`: the train split's list."""
    from imagelm.data.folder import FolderSet
    from imagelm.data.images import open_image, to_tensor

    fs = FolderSet(root, channels, size, classes, strict, say=lambda m: log.warning(m))
    images, labels, skipped = [], [], 0
    for i in range(len(fs)):
        try:
            im = open_image(fs.path(i), {1: "L", 3: "RGB"}[channels]).resize((size, size), 3)   # 3: bicubic
        except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt file
            if strict:
                raise ValueError(f"cannot decode {fs.path(i)}: {e}") from e
            log.warning("skipping unreadable image %s: %s", fs.path(i), e)
            skipped += 1
            continue
        images.append(to_tensor(im))
        labels.append(int(fs.labels[i]))
    if not images:
        raise DatasetMissing(f"no readable images under {root}")
    return ImageData(torch.stack(images), torch.tensor(labels), fs.classes, skipped)


def synthetic(n: int, size: int, channels: int, classes: int = 4, seed: int = 0) -> ImageData:
    """Learnable toy images for tests: class c is a bright bar at a class-specific place."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.rand(n, channels, size, size, generator=g) * 60
    band = max(1, size // classes)
    for c in range(classes):
        x[labels == c, :, c * band:(c + 1) * band, :] += 150
    return ImageData(x.clamp(0, 255).to(torch.uint8), labels, [f"class{c}" for c in range(classes)])


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) uint8 -> (N, C, size, size) uint8, bilinear (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    flat = images.flatten(0, -4)
    out = [torch.nn.functional.interpolate(b.float(), size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=b.shape[-1] > size) for b in flat.split(4096)]
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8).view(*images.shape[:-2], size, size)


def _ensure(kinds: list[str], split: str, root: str, n: int) -> list:
    """The built corpora (built on first use, by rank 0 first under DDP)."""
    from imagelm import dist
    from imagelm.data import corpora

    if dist.world_size() > 1:
        if torch.distributed.get_rank() == 0:
            for k in kinds:
                corpora.ensure_corpus(k, split, root or None, n or None)
        dist.barrier()
    return [corpora.ensure_corpus(k, split, root or None, n or None) for k in kinds]


def image_text(kinds: list[str], split: str, size: int, root: str = "", n: int = 0) -> ImageData:
    """Captioned corpora (captions, scenes) as one in-memory set resized to size x size, label -1
    where a sample has none (scenes): for bounded eval sets (held-out scenes), not for training."""
    from imagelm.data import corpora

    parts = [corpora.load_image_text(c.shards) for c in _ensure(kinds, split, root, n)]
    return ImageData(torch.cat([resize(p.images, size) for p in parts]), torch.cat([p.labels for p in parts]),
                     list(FASHION_MNIST_CLASSES), sum(p.skipped for p in parts),
                     texts=[c for p in parts for c in p.captions], corpus={"root": root or None, "n": n or None})


def split_root(data_cfg, split: str) -> str:
    """Where a split of a folder / shard dataset lies: ROOT/train, ROOT/val or ROOT/test (test
    falls back to val, ImageNet's name); shards whose root has no such subfolders are the train
    split, and a pattern naming 'train' gives the test split with 'val' or 'test' in its place."""
    from imagelm.data.webdataset import expand_urls

    if not data_cfg.root:
        raise DatasetMissing(f"data.dataset={data_cfg.dataset} needs data.root= (an image folder ROOT/train/CLASS/* "
                             f"or WebDataset shards)")
    root = Path(data_cfg.root)
    names = ("train",) if split == "train" else ("test", "val")
    if root.is_dir():
        for n in names:
            if (root / n).is_dir():
                return str(root / n)
        if data_cfg.dataset in SHARDS and split == "train" and not any(
                (root / n).is_dir() for n in ("test", "val")):
            return str(root)
        raise DatasetMissing(f"{root} has no {' or '.join(names)} split folder (expected {root}/train/... and "
                             f"{root}/val/ or {root}/test/)")
    if not any(c in data_cfg.root for c in "{*?[") and not root.exists():
        raise DatasetMissing(f"data.root {root} does not exist (data.dataset={data_cfg.dataset})")
    if data_cfg.dataset in SHARDS:
        if split == "train":
            return data_cfg.root
        for n in names:      # train-{000000..001023}.tar -> val-*.tar: the twin's count may differ
            alt = re.sub(r"\{[^{}]*\}", "*", data_cfg.root.replace("train", n))
            if alt != data_cfg.root and expand_urls(alt):
                return alt
        raise DatasetMissing(f"no test shards for {data_cfg.root}: give a folder with train/ and val/ (or test/) "
                             f"subfolders, or a pattern naming 'train' with a 'val' or 'test' twin")
    raise DatasetMissing(f"image folder {root} does not exist")


def is_streamed(data) -> bool:
    return not isinstance(data, ImageData)


def labelled(data) -> bool:
    """Whether every sample has a class (probes need one)."""
    return bool((data.labels >= 0).all()) if isinstance(data, ImageData) else data.labelled


PREPARE_IMAGES = 5000     # images a method's prepare() (tokenizer, palette) sees of a streamed set
PREPARE_TEXTS = 10000     # captions (or documents) a method's prepare() (text tokenizer, text pool) sees


def in_memory(data, n: int = PREPARE_IMAGES) -> ImageData:
    """The dataset itself when it is in memory; else a bounded sample of about n decoded images
    spread over it (the same each time; image-text shards: with their captions), for what needs
    pixels up front: tokenizers, sample grids, eval's fine-tunes."""
    if isinstance(data, ImageData):
        return data
    from imagelm.data.stream import sample
    return sample(data, n, data.workers)


class Preview:
    """What a method's prepare() sees of a streamed set: a bounded sample, each part read on first
    use (a method that fits only a text tokenizer decodes no image). images, labels: PREPARE_IMAGES
    decoded images; texts: the captions of PREPARE_TEXTS samples (image-text shards; read without
    their images); documents: PREPARE_TEXTS documents as parts (interleaved)."""

    def __init__(self, data):
        self.data, self.mean, self.std, self.classes = data, data.mean, data.std, data.classes
        self.corpus, self.images_per_sample = data.corpus, data.images_per_sample

    @functools.cached_property
    def _decoded(self) -> ImageData:
        return in_memory(self.data)

    @property
    def images(self) -> torch.Tensor:
        return self._decoded.images

    @property
    def labels(self) -> torch.Tensor:
        return self._decoded.labels

    @functools.cached_property
    def texts(self) -> list[str] | None:
        from imagelm.data.shards import ShardSet
        return self.data.sample_texts(PREPARE_TEXTS) if isinstance(self.data, ShardSet) and self.data.text else None

    @functools.cached_property
    def documents(self) -> list[list] | None:
        from imagelm.data.documents import InterleavedSet
        return self.data.sample_documents(PREPARE_TEXTS) if isinstance(self.data, InterleavedSet) else None


def preview(data):
    """What a method's prepare() gets: an in-memory set itself, a bounded Preview of a streamed one."""
    return data if isinstance(data, ImageData) else Preview(data)


SHARDS = ("shards", "image-text")                    # data.root is the user's shards
CORPORA = ("captions", "scenes", "captions+scenes")  # built image-text corpora: shards as well


def corpus_place(data_cfg) -> tuple[str | None, int | None]:
    """(root, n) of the built corpora a run's eval reads beside its data (held-out scenes): the
    run's own corpus folder and size when it trains on built corpora, else the default cache."""
    if data_cfg.dataset in CORPORA or data_cfg.dataset == "interleaved":
        return data_cfg.root or None, data_cfg.corpus_size or None
    return None, None


def _open(data_cfg, model_cfg, split: str, train=None):
    """A streamed split, listed (not decoded), with the train split's classes: a folder, shards,
    built corpora (their shards or, interleaved, documents + image shards)."""
    from imagelm.data.folder import FolderSet
    from imagelm.data.shards import ShardSet

    size, chans, strict = model_cfg.img_size, model_cfg.in_chans, data_cfg.strict
    corpus = {"root": data_cfg.root or None, "n": data_cfg.corpus_size or None}
    if data_cfg.dataset == "interleaved":
        from imagelm.data.documents import InterleavedSet
        c, = _ensure(["interleaved"], split, data_cfg.root, data_cfg.corpus_size)
        ds = InterleavedSet(c.jsonl, c.shards, chans, size, data_cfg.max_images, list(FASHION_MNIST_CLASSES), strict,
                            corpus)
    elif data_cfg.dataset in CORPORA:
        cs = _ensure(data_cfg.dataset.split("+"), split, data_cfg.root, data_cfg.corpus_size)
        counts = [c.manifest.get("counts") for c in cs]
        ds = ShardSet([u for c in cs for u in c.shards], chans, size, list(FASHION_MNIST_CLASSES), strict,
                      data_cfg.shuffle_buffer, text=True, corpus=corpus, labelled=data_cfg.dataset == "captions",
                      counts=[n for k in counts for n in k] if all(counts) else None)
    else:
        root = split_root(data_cfg, split)
        classes = train.classes if train is not None else None
        args = (root, chans, size, classes, strict)
        ds = FolderSet(*args) if data_cfg.dataset == "folder" else \
            ShardSet(*args, data_cfg.shuffle_buffer, text=data_cfg.dataset == "image-text")
    ds.workers = data_cfg.workers
    return ds


def _read(data_cfg, model_cfg, split: str) -> ImageData:
    if data_cfg.dataset == "fashion-mnist":
        return fashion_mnist(split, data_cfg.root)
    n, seed = {"train": (512, 0), "test": (256, 1)}[split]
    return synthetic(n, model_cfg.img_size, model_cfg.in_chans, seed=seed)


def load(data_cfg, model_cfg, split: str, train=None):
    """The split ('train' or 'test') of the configured dataset, standardised with train-split
    statistics: those of `train` when given (so the train split is not read twice). Folders,
    shards, the image-text corpora and interleaved documents are streamed (listed, not decoded;
    statistics from a sample); Fashion-MNIST and synthetic data are an in-memory ImageData."""
    if data_cfg.dataset not in ("fashion-mnist", "synthetic"):
        from imagelm.data.stream import fit_stats
        if train is None and split != "train":
            train = _open(data_cfg, model_cfg, "train")
        ds = _open(data_cfg, model_cfg, split, train)
        if train is None:
            train = ds
        if not train.mean:
            fit_stats(train, data_cfg.workers)
        ds.mean, ds.std = train.mean, train.std
        return ds
    ds = _read(data_cfg, model_cfg, split)
    if train is None:
        train = ds if split == "train" else _read(data_cfg, model_cfg, "train")
    if data_cfg.resize:
        ds.images = resize(ds.images, model_cfg.img_size)
        train.images = resize(train.images, model_cfg.img_size)
    ref = train.images
    if ref.shape[1] != model_cfg.in_chans or ref.shape[-1] != model_cfg.img_size:
        raise DataError(f"{data_cfg.dataset} images are {tuple(ref.shape[1:])}, but model.in_chans="
                         f"{model_cfg.in_chans} and model.img_size={model_cfg.img_size}")
    if train.mean and train is not ds:
        ds.mean, ds.std = train.mean, train.std
    else:
        f = ref.float().div_(255).transpose(0, 1).reshape(ref.shape[1], -1)
        ds.mean, ds.std = f.mean(1).tolist(), f.std(1).tolist()
    return ds
