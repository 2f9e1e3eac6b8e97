"""WebDataset image shards (NNNNNN.tar holding KEY.jpg|png|webp + optional KEY.cls / KEY.json, and
for image-text data KEY.txt: the layout img2dataset and timm's readers use) read from disk as it trains.

A shard is scanned by its tar headers only (tarfile seeks over the data), giving a reference
(offset, size) per field; bytes are read when a sample leaves the shuffle buffer. So the sample
stream of a reader is a pure function of (seed, reader, shard list) and resuming at step t skips
the references of the first steps without reading image bytes, landing exactly where an
uninterrupted run would be, shuffle buffer contents included. Member names are never used as
paths on disk: nothing is extracted.

Streams: the global batch is drawn from S shard streams (`lanes`: fixed by the run's batch and
data.streams, never by its ranks or workers). Epoch e is the shards in an order seeded by (seed, e),
their samples end to end; stream l reads the l-th of S equal contiguous parts of it (`part`), so in
one epoch every sample is read by exactly one stream, and streams stay equally long. Which process
reads a stream is the loader's business (data/stream.py)."""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
import tarfile
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from imagelm.data.images import DataError, eval_view, train_view
from imagelm.data.webdataset import IMAGE_EXTS, expand_urls

log = logging.getLogger(__name__)

INFO = "shards.json"     # written by `imagelm data shards`: per-shard sample counts and the class list


class Ref(NamedTuple):
    url: str
    key: str
    ext: str          # the image field's extension
    offset: int       # of the image bytes in the tar
    size: int
    cls: tuple[int, int] | None      # (offset, size) of KEY.cls
    meta: tuple[int, int] | None     # (offset, size) of KEY.json
    txt: tuple[int, int] | None = None   # (offset, size) of the caption, KEY.txt (or .text, .caption)


class ScanStats:
    def __init__(self):
        self.duplicates = self.no_image = self.bad_shards = 0


def scan(url: str, strict: bool = False, stats: ScanStats | None = None) -> Iterator[Ref]:
    """The samples of one shard from its headers, in member order. A sample needs an image field;
    a key seen before in the shard is a duplicate (counted, left out); a shard cut short yields
    the samples before the cut (counted as a bad shard; DataError under strict)."""
    stats = stats or ScanStats()
    seen: set[str] = set()
    cur: dict = {}

    def done() -> Ref | None:
        if not cur:
            return None
        img = next((e for e in cur["fields"] if e.rsplit(".", 1)[-1].lower() in IMAGE_EXTS), None)
        if cur["key"] in seen:
            stats.duplicates += 1
            return None
        seen.add(cur["key"])
        if img is None:
            stats.no_image += 1
            return None
        f = cur["fields"]
        return Ref(url, cur["key"], img, *f[img], f.get("cls"), f.get("json"),
                   f.get("txt") or f.get("text") or f.get("caption"))

    try:
        with open(url.removeprefix("file://"), "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
            while True:
                m = tf.next()
                tf.members.clear()           # tarfile keeps every header otherwise
                if m is None:
                    break
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                stem, _, ext = base.partition(".")
                if not ext or stem.startswith("."):
                    continue                 # no field (README), ._ files from macOS tar
                key = f"{d}/{stem}" if d else stem
                if cur and cur["key"] != key:
                    ref = done()
                    cur = {}
                    if ref is not None:
                        yield ref
                if not cur:
                    cur = {"key": key, "fields": {}}
                if ext in cur["fields"]:
                    stats.duplicates += 1
                cur["fields"][ext] = (m.offset_data, m.size)
            ref = done()
            if ref is not None:
                yield ref
    except FileNotFoundError:
        raise DataError(f"shard {url} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        if strict:
            raise DataError(f"cannot read shard {url}: {e}") from e
        log.warning("shard %s is unreadable past this point: %s", url, e)
        stats.bad_shards += 1
        ref = done()
        if ref is not None:
            yield ref


class Reader:
    """Reads the bytes behind Refs, keeping a few shards open."""

    def __init__(self, keep: int = 4):       # keep: at least the shards read in turn (one a stream)
        self.files: dict[str, object] = {}
        self.keep = keep

    def read(self, url: str, where: tuple[int, int]) -> bytes:
        f = self.files.get(url)
        if f is None:
            if len(self.files) >= self.keep:
                self.files.pop(next(iter(self.files))).close()
            f = self.files[url] = open(url.removeprefix("file://"), "rb")
        f.seek(where[0])
        data = f.read(where[1])
        if len(data) != where[1]:
            raise DataError(f"shard {url} is cut short inside this sample")
        return data

    def label(self, ref: Ref) -> int:
        if ref.cls is not None:
            return int(self.read(ref.url, ref.cls).decode("utf-8").strip())
        if ref.meta is not None:
            meta = json.loads(self.read(ref.url, ref.meta).decode("utf-8"))
            for k in ("label", "cls", "class"):
                if isinstance(meta, dict) and isinstance(meta.get(k), int):
                    return meta[k]
        return -1

    def caption(self, ref: Ref) -> str:
        if ref.txt is None:
            raise DataError("no caption (KEY.txt)")
        return self.read(ref.url, ref.txt).decode("utf-8")


class ShardSet:
    """The shards of data.root: a folder of *.tar, a brace pattern, a glob, or a list of shards.
    text: each sample's caption (KEY.txt) is part of it (image-text data). counts: samples per
    shard when the caller knows them (a built corpus's manifest)."""
    workers = -1
    eval_skipped = 0
    skipped = 0               # unreadable files found before training (none: found as it trains)
    images_per_sample = 1

    def __init__(self, root: str | list[str], channels: int, size: int, classes: list[str] | None = None,
                 strict: bool = False, shuffle_buffer: int = 1000, say=print, text: bool = False,
                 counts: list[int] | None = None, corpus: dict | None = None, labelled: bool | None = None):
        from imagelm.data.sources import DatasetMissing

        self.root, self.channels, self.size, self.strict = root, channels, size, strict
        self.shuffle_buffer, self.text, self.corpus = shuffle_buffer, text, corpus
        self.urls = list(root) if isinstance(root, list) else sorted(expand_urls(root))
        if not self.urls:
            raise DatasetMissing(f"no shards (*.tar) at {root}")
        missing = [u for u in self.urls if "://" not in u and not os.path.isfile(u)]
        if missing:
            raise DatasetMissing(f"{len(missing)} shard(s) of {root} do not exist, e.g. {missing[0]}")
        info = self._info()
        self.counts = list(counts) if counts is not None else self._counts(info, say)
        self.classes = list(classes) if classes is not None else list(info.get("classes") or [])
        self.labelled = bool(self.classes) if labelled is None else labelled    # every sample has a class
        self.mean: list[float] = []
        self.std: list[float] = []
        self.labels: torch.Tensor | None = None     # read with the images (KEY.cls)

    def _info(self) -> dict:
        p = Path(os.path.dirname(self.urls[0])) / INFO
        try:
            return json.loads(p.read_text()) if p.is_file() else {}
        except (OSError, ValueError):
            return {}

    def _counts(self, info: dict, say) -> list[int]:
        """Samples per shard: from shards.json, img2dataset's NNNNN_stats.json ("successes"), or
        a header scan (a one-off pass over the tar headers, no image bytes)."""
        known = {s["name"]: int(s["samples"]) for s in info.get("shards", []) if isinstance(s, dict)}
        out, scanned = [], 0
        for u in self.urls:
            name = os.path.basename(u)
            n = known.get(name)
            if n is None:
                stats = Path(u[:-len(".tar")] + "_stats.json") if u.endswith(".tar") else None
                try:
                    n = int(json.loads(stats.read_text())["successes"]) if stats and stats.is_file() else None
                except (OSError, ValueError, KeyError, TypeError):
                    n = None
            if n is None:
                n = sum(1 for _ in scan(u, self.strict))
                scanned += 1
            out.append(n)
        if scanned > 5:
            say(f"counted the samples of {scanned} shards from their headers (no {INFO} next to them)")
        return out

    def __len__(self) -> int:
        return sum(self.counts)

    def refs(self) -> Iterator[Ref]:
        """Every sample in shard order (eval, statistics)."""
        for u in self.urls:
            yield from scan(u, self.strict)

    def spread(self, n: int) -> list[tuple[str, int]]:
        """(shard, samples to take from its start) for a bounded sample of about n samples spread
        over the shards (not the first shards only: a corpus of several kinds has each in it)."""
        if len(self.urls) > n:
            return [(self.urls[i * len(self.urls) // n], 1) for i in range(n)]
        return [(u, -(-n // len(self.urls))) for u in self.urls]

    def sample_texts(self, n: int) -> list[str]:
        """The captions of about n samples spread over the shards, read without their images: the
        bounded text sample a text tokenizer is trained on."""
        rd, out = Reader(), []
        for url, k in self.spread(n):
            for ref in itertools.islice(scan(url, self.strict), k):
                try:
                    out.append(rd.caption(ref))
                except (DataError, UnicodeDecodeError) as e:
                    if self.strict:
                        raise DataError(f"cannot read the caption of sample {ref.key!r} in shard {url}: {e}") from e
        return out

    def lanes(self, global_batch: int, streams: int) -> int:
        """S, the shard streams of a run: the largest divisor of the batch within data.streams (each
        stream gives batch / S samples of a step)."""
        return max(d for d in range(1, min(streams, global_batch) + 1) if global_batch % d == 0)

    def part(self, stream: int, streams: int, seed: int, epoch: int) -> list[tuple[str, int, int]]:
        """Stream `stream`'s part of an epoch: (shard, first, stop) sample ranges. The epoch is the
        shards in an order seeded by (seed, epoch), their samples end to end; each stream takes its
        contiguous 1/S of it, so streams are equally long (to one sample) however the shards fall."""
        order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        total = sum(self.counts)
        lo, hi = stream * total // streams, (stream + 1) * total // streams
        out, at = [], 0
        for i in order.tolist():
            a, b = max(lo, at), min(hi, at + self.counts[i])
            if a < b:
                out.append((self.urls[i], a - at, b - at))
            at += self.counts[i]
        return out

    def stream(self, reader: int, readers: int, seed: int, skip: int = 0, buffer: int | None = None) -> Iterator[Ref]:
        """Stream `reader` of `readers`: endless, epoch after epoch over its part (`part`), through
        a shuffle buffer of `buffer` references (default data.shuffle_buffer; drained at the end of
        each epoch, so an epoch yields each of its samples once), seeded by (seed, reader, epoch),
        so it replays exactly. The first `skip` samples are left out: whole epochs by the shard
        counts (nothing read), the rest of the way by headers (no image bytes); a part that starts
        inside a shard reads the headers before it."""
        buffer = self.shuffle_buffer if buffer is None else buffer
        epoch = 0
        while True:
            mine = self.part(reader, readers, seed, epoch)
            n = sum(b - a for _, a, b in mine)
            if 0 < n <= skip:
                skip, epoch = skip - n, epoch + 1
                continue
            rng = random.Random((seed * 1_000_003 + reader) * 1_000_003 + epoch)
            buf: list[Ref] = []
            got = 0
            for url, a, b in mine:
                for ref in itertools.islice(scan(url, self.strict), a, b):
                    got += 1
                    if buffer > 0:
                        if len(buf) < buffer:
                            buf.append(ref)
                            continue
                        j = rng.randrange(len(buf))
                        ref, buf[j] = buf[j], ref
                    if skip:
                        skip -= 1
                    else:
                        yield ref
            if not got:
                raise DataError(f"stream {reader} of {readers} found no samples in its part of {self.root} (shards "
                                f"cut short after their samples were counted? remove their *_stats.json / {INFO})")
            rng.shuffle(buf)          # the epoch ends with its own samples: no sample crosses into the next
            for ref in buf:
                if skip:
                    skip -= 1
                else:
                    yield ref
            short = n - got           # shards hold fewer than counted (cut after counting): the epoch keeps its
            if short:                 # counted length with its first samples again, so skipping by counts lands right
                log.warning("stream %d of %s: %d samples fewer than its shards' counts say", reader, self.root, short)
            while short:
                for ref in (r for url, a, b in mine for r in itertools.islice(scan(url, self.strict), a, b)):
                    if not short:
                        break
                    short -= 1
                    if skip:
                        skip -= 1
                    else:
                        yield ref
            epoch += 1

    # --- per-sample work, in DataLoader workers -------------------------------------------------
    def train_sample(self, rd: Reader, ref: Ref, u: np.ndarray, cfg, text: bool = False
                     ) -> tuple[np.ndarray | None, int, str | None, str]:
        """(image (S, S, C), label, caption (when `text`), error) of one sample."""
        try:
            x = train_view(rd.read(ref.url, (ref.offset, ref.size)), self.channels, self.size, u, cfg.crop_scale,
                           cfg.crop_ratio, cfg.flip, cfg.color_jitter)
            return x, rd.label(ref), rd.caption(ref) if text else None, ""
        except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt sample
            return None, -1, None, f"cannot decode sample {ref.key!r} ({ref.ext}) in shard {ref.url}: {e}"

    def eval_sample(self, rd: Reader, ref: Ref) -> tuple[np.ndarray | None, int, str | None, str]:
        try:
            x = eval_view(rd.read(ref.url, (ref.offset, ref.size)), self.channels, self.size)
            return x, rd.label(ref), rd.caption(ref) if self.text else None, ""
        except Exception as e:  # noqa: BLE001
            return None, -1, None, f"cannot decode sample {ref.key!r} ({ref.ext}) in shard {ref.url}: {e}"


# ----------------------------------------------------------------------------- writing

def _write_shard(job: tuple) -> tuple[str, int, int]:
    """One shard from (path, label, key) items: written under a temporary name, renamed when
    complete. Returns (name, samples, skipped)."""
    import io

    from PIL import Image

    from imagelm.data.images import open_image

    out, name, items, classes, max_side, root = job
    tmp = Path(out) / f".{name}.tmp"
    n = skipped = 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for path, label, key in items:
            try:
                with Image.open(path) as im:
                    fmt, size = im.format, im.size
                    im.verify()               # a corrupt file is left out here, not in every epoch
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(fmt)
                if ext is None or (max_side and max(size) > max_side) or fmt == "PNG" and _is16(path):
                    mode = "RGB" if fmt != "PNG" or _mode(path) not in ("L", "I", "I;16", "I;16B", "F", "1") else "L"
                    im = open_image(path, mode)
                    if max_side and max(im.size) > max_side:
                        s = max_side / max(im.size)
                        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.BICUBIC)
                    buf, ext = io.BytesIO(), ("jpg" if fmt == "JPEG" else "png")
                    im.save(buf, format="JPEG" if ext == "jpg" else "PNG", quality=95)
                    data = buf.getvalue()
                else:
                    data = Path(path).read_bytes()
            except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt file
                log.warning("leaving out unreadable image %s: %s", path, e)
                skipped += 1
                continue
            meta = json.dumps({"label": label, "class": classes[label], "file": os.path.relpath(path, root)})
            for field, value in ((ext, data), ("cls", str(label).encode()), ("json", meta.encode())):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mode, info.mtime = len(value), 0o444, 0
                tf.addfile(info, io.BytesIO(value))
            n += 1
    os.replace(tmp, Path(out) / name)
    return name, n, skipped


def _mode(path: str) -> str:
    from PIL import Image
    with Image.open(path) as im:
        return im.mode


def _is16(path: str) -> bool:
    return _mode(path).startswith("I")


def write_shards(src: str | Path, out: str | Path, shard_size: int = 1000, max_side: int = 0, workers: int = 0,
                 seed: int = 0, say=print) -> dict:
    """An image folder (ROOT/CLASS/* or ROOT/{train,val,test}/CLASS/*) as WebDataset shards
    OUT[/SPLIT]/NNNNNN.tar with KEY.jpg|png + KEY.cls + KEY.json, samples in a seeded random
    order (so a shard mixes classes), written in parallel. Rerunning skips complete shards.
    Every split takes the train split's class list. Returns {split: info}."""
    from multiprocessing import get_context

    from tqdm import tqdm

    from imagelm.data.folder import FolderSet

    src, out = Path(src), Path(out)
    splits = [s for s in ("train", "val", "test") if (src / s).is_dir()]
    pairs = [(src / s, out / s, s) for s in splits] if splits else [(src, out, "")]
    workers = workers or max(1, (os.cpu_count() or 1))
    res, classes = {}, None
    for folder, dest, split in pairs:
        fs = FolderSet(folder, 3, 1, classes, say=say)
        classes = classes or fs.classes
        dest.mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng(seed).permutation(len(fs))
        jobs, done = [], {}
        for k, start in enumerate(range(0, len(fs), shard_size)):
            name = f"{k:06d}.tar"
            if (dest / name).is_file():          # complete: shards are renamed into place when finished
                done[name] = sum(1 for _ in scan(str(dest / name)))
                continue
            items = [(fs.path(i), int(fs.labels[i]), f"{start + j:09d}")
                     for j, i in enumerate(order[start:start + shard_size].tolist())]
            jobs.append((str(dest), name, items, classes, max_side, str(folder)))
        skipped = 0
        bar = tqdm(total=len(jobs), desc=f"shards {split or dest.name}", unit="shard")
        with get_context("fork").Pool(min(workers, max(1, len(jobs)))) as pool:
            for name, n, s in pool.imap_unordered(_write_shard, jobs):
                done[name], skipped = n, skipped + s
                bar.update(1)
        bar.close()
        info = {"format": "imagelm-shards", "source": str(folder), "classes": classes, "images": sum(done.values()),
                "skipped": skipped, "shards": [{"name": k, "samples": done[k]} for k in sorted(done)]}
        (dest / INFO).write_text(json.dumps(info, indent=1))
        say(f"{dest}: {info['images']} images in {len(done)} shards ({len(jobs)} written now, "
            f"{len(done) - len(jobs)} already complete), {skipped} unreadable files left out")
        res[split or dest.name] = info
    return res
