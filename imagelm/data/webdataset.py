"""WebDataset tar shards: a writer and a streaming reader, with stdlib tarfile and Pillow.

A shard is a plain tar whose members are grouped into samples by key, the WebDataset convention:
`dir/000042.png` and `dir/000042.txt` are the fields "png" and "txt" of the sample "dir/000042"
(key = path up to the first dot of the file name, field = the rest). Members of one sample are
consecutive. The same reader reads CC3M/LAION-style shards made by img2dataset."""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_EXTS = {"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"}
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass
class ReadStats:
    samples: int = 0        # samples yielded
    skipped: int = 0        # samples left out because a field could not be decoded
    bad_shards: int = 0     # shards that could not be opened or ended mid-member


# ----------------------------------------------------------------------------- writing

def encode_png(image: torch.Tensor | np.ndarray, compress_level: int = 1) -> bytes:
    """(C, H, W) uint8 with C in {1, 3} -> PNG bytes. Level 1: tiny images barely compress
    further, and building 60k samples stays a few seconds."""
    from PIL import Image

    a = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    a = np.ascontiguousarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _field_bytes(ext: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (torch.Tensor, np.ndarray)) and ext in IMAGE_EXTS:
        if ext != "png":
            raise ValueError(f"only png is encoded from tensors; pass {ext} as bytes")
        return encode_png(value)
    if isinstance(value, (dict, list, int, float, bool)) or value is None:
        return json.dumps(value).encode("utf-8")          # an int under .cls is the same text
    raise TypeError(f"cannot write a {type(value).__name__} as .{ext}")


class ShardWriter:
    """Writes samples {"__key__": "000042", "png": tensor|bytes, "txt": str, "json": dict} to
    out_dir/prefix-000000.tar, starting a new shard every `maxcount` samples. Each shard is
    written under a temporary name and renamed when complete, so a crash never leaves a
    half-written shard under a shard's name."""

    def __init__(self, out_dir: str | Path, prefix: str, maxcount: int = 1000):
        self.out_dir, self.prefix, self.maxcount = Path(out_dir), prefix, maxcount
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[Path] = []     # completed shards, in order
        self.counts: list[int] = []      # their samples
        self.count = 0                   # samples written in all
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def _open(self) -> None:
        tmp = self.out_dir / f".{self.prefix}-{len(self.shards):06d}.tar.tmp"
        self._tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
        self._in_shard = 0

    def _finish(self) -> None:
        assert self._tar is not None
        tmp = Path(self._tar.name)
        self._tar.close()
        self._tar = None
        final = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        os.replace(tmp, final)
        self.shards.append(final)
        self.counts.append(self._in_shard)

    def write(self, sample: dict[str, Any]) -> None:
        key = str(sample["__key__"])
        if "." in Path(key).name:
            raise ValueError(f"sample key {key!r} has a dot: readers split the key at the first dot")
        if self._tar is None:
            self._open()
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            data = _field_bytes(ext, value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0    # mtime 0: same bytes every build
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self._in_shard += 1
        if self._in_shard >= self.maxcount:
            self._finish()

    def close(self) -> list[Path]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:     # failed: drop the partial shard rather than publish it
            tmp = Path(self._tar.name)
            self._tar.close()
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- shard lists

def brace_expand(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar'] (zero padding kept from the
    first bound); '{x,y}' alternatives; several braces expand left to right, as in bash."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1))
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [s for item in items for s in brace_expand(head + item + tail)]


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard list from a brace pattern, a glob, a directory (its *.tar, sorted), a URL, or a list
    of any of these. Nothing is checked for existence here: opening a missing shard fails later."""
    items = [urls] if isinstance(urls, (str, Path)) else list(urls)
    out: list[str] = []
    for item in items:
        for s in brace_expand(str(item)):
            if "://" in s:
                out.append(s)
            elif os.path.isdir(s):
                out.extend(sorted(glob.glob(os.path.join(glob.escape(s), "*.tar"))))
            elif any(c in s for c in "*?["):
                out.extend(sorted(glob.glob(s)))
            else:
                out.append(s)
    return out


def shard_slice(shards: Sequence[str], rank: int = 0, world: int = 1, worker: int = 0, workers: int = 1) -> list[str]:
    """The shards one reader reads: reader r = rank * workers + worker of world * workers takes
    shards r, r + world*workers, ... so every shard is read by exactly one (rank, worker). With
    fewer shards than readers, some readers get none; give corpora at least world*workers shards."""
    if not (0 <= rank < world and 0 <= worker < workers):
        raise ValueError(f"rank {rank} of {world} / worker {worker} of {workers} is out of range")
    return list(shards[rank * workers + worker::world * workers])


# ----------------------------------------------------------------------------- reading

def decode_image(data: bytes) -> torch.Tensor:
    """Image bytes -> (C, H, W) uint8, C = 1 for greyscale and 3 otherwise. Fully decoded here,
    so a truncated file fails now, not in a training step."""
    from PIL import Image

    from imagelm.data.images import open_image, to_tensor

    with Image.open(io.BytesIO(data)) as im:      # greyscale stays 1 channel, 16-bit is scaled to 8
        mode = "L" if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16") else "RGB"
    return to_tensor(open_image(data, mode))


def decode_field(ext: str, data: bytes) -> Any:
    """png/jpg/... -> (C, H, W) uint8 tensor; txt -> str; json -> object; cls -> int; else bytes."""
    last = ext.rsplit(".", 1)[-1].lower()
    if last in IMAGE_EXTS:
        return decode_image(data)
    if last in ("txt", "text", "caption"):
        return data.decode("utf-8")
    if last == "json":
        return json.loads(data.decode("utf-8"))
    if last == "cls":
        return int(data.decode("utf-8").strip())
    return data


def _split_name(name: str) -> tuple[str, str]:
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext


def _open_stream(url: str):
    if "://" in url and not url.startswith("file://"):
        from urllib.request import urlopen
        return urlopen(url)           # noqa: S310 - a shard URL the user gave
    return open(url.removeprefix("file://"), "rb")


def _raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """{"__key__", "__url__", ext: bytes} for each run of consecutive members with one key, streamed
    (no seeking, so an http(s):// shard is read as it arrives)."""
    with _open_stream(url) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        cur: dict[str, Any] | None = None
        for m in tf:
            if not m.isfile():
                continue
            key, ext = _split_name(m.name)
            if not ext or os.path.basename(key).startswith("."):
                continue                 # no field (README, ._ files from macOS tar)
            if cur is not None and cur["__key__"] != key:
                yield cur                # before reading on: a shard cut off later still gives this sample
                cur = None
            data = tf.extractfile(m).read()
            if cur is None:
                cur = {"__key__": key, "__url__": url}
            cur[ext] = data
        if cur is not None:
            yield cur


def iter_samples(urls: str | Path | Sequence[str | Path], rank: int = 0, world: int = 1, worker: int = 0,
                 workers: int = 1, strict: bool = False, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples {"__key__", "__url__", "png": (C, H, W) uint8, "txt": str, "json": ...} of
    this reader's shards (`shard_slice`), in shard order. A sample with a field that cannot be
    decoded is skipped and counted in `stats` (ValueError naming shard and key under strict); a
    shard that cannot be read to its end counts as a bad shard after yielding what it had."""
    stats = stats if stats is not None else ReadStats()
    for url in shard_slice(expand_urls(urls), rank, world, worker, workers):
        it = _raw_samples(url)
        while True:
            try:
                raw = next(it)
            except StopIteration:
                break
            except FileNotFoundError:
                raise
            except (tarfile.TarError, OSError, EOFError) as e:
                if strict:
                    raise ValueError(f"cannot read shard {url}: {e}") from e
                log.warning("shard %s is unreadable past this point: %s", url, e)
                stats.bad_shards += 1
                break
            try:
                sample = {k: (v if k.startswith("__") else decode_field(k, v)) for k, v in raw.items()}
            except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt sample
                if strict:
                    raise ValueError(f"cannot decode sample {raw['__key__']!r} in shard {url}: {e}") from e
                log.warning("skipping sample %s in %s: %s", raw["__key__"], url, e)
                stats.skipped += 1
                continue
            stats.samples += 1
            yield sample


class WebDataset(torch.utils.data.IterableDataset):
    """iter_samples as a DataLoader dataset: each (DDP rank, dataloader worker) streams its own
    shards, the rank from torch.distributed when it is initialised. Skip counts stay in each
    worker's process (`stats` is only complete with num_workers=0)."""

    def __init__(self, urls: str | Path | Sequence[str | Path], strict: bool = False):
        self.shards, self.strict, self.stats = expand_urls(urls), strict, ReadStats()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch.distributed as dist

        info = torch.utils.data.get_worker_info()
        ddp = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter_samples(self.shards, rank, world, worker, workers, self.strict, self.stats)
