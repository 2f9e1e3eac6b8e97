"""MMC4-style interleaved documents (a JSONL file, one document a line: text_list + image_info with
matched_text_index) and their image shards, read from disk as training runs.

Documents are a map-style set like an image folder: the JSONL is indexed once by the byte offset
of each line (8 B a document, no parsing), and a document is read, parsed and checked when a
step needs it. Images are found in the shards by key (the image_name's stem) through an index of
the shards' tar headers (one scan, no image bytes; ~30 B an image in numpy arrays, which forked
workers share without copy-on-write growth). A sample is a document: its first J = data.max_images
images (J slots, zeros where it has fewer) and its parts in reading order, text segments and
image slots, which the method lays out in the worker. Both indexes are kept under $IMAGELM_CACHE
(index/) and read back while the JSONL and the shards are unchanged (path, size, mtime), so a
corpus of millions of documents is scanned once, not at every start."""
from __future__ import annotations

import array
import json
import logging
import os

import numpy as np

from imagelm.cache import cache_dir, files_key
from imagelm.data.corpora import _document_problem
from imagelm.data.folder import REPLACE_TRIES
from imagelm.data.images import DataError, train_view
from imagelm.data.shards import Reader, ShardSet, scan

log = logging.getLogger(__name__)
INDEX_VERSION = 1        # bump when what _index builds changes


def line_starts(path: str, chunk: int = 1 << 20) -> np.ndarray:
    """(N,) int64 byte offsets of the non-empty lines of a file, read in 1 MiB chunks (bounded memory)."""
    starts, ends, pos = [np.zeros(1, np.int64)], [], 0
    with open(path, "rb") as f:
        while b := f.read(chunk):
            nl = np.flatnonzero(np.frombuffer(b, np.uint8) == 10).astype(np.int64) + pos
            ends.append(nl)
            starts.append(nl + 1)
            pos += len(b)
    s, e = np.concatenate(starts), np.concatenate(ends + [np.array([pos], np.int64)])
    return s[e > s]


def parse(raw: bytes) -> tuple[dict | None, str]:
    """A JSONL line -> (document, "") or (None, why it is not one)."""
    try:
        d = json.loads(raw.decode("utf-8"))
        why = _document_problem(d)
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except ValueError:
        return None, "invalid JSON"
    return (d, "") if why is None else (None, why)


def image_key(name: str) -> str:
    return os.path.basename(name).rsplit(".", 1)[0]


def _index(jsonl: str, shards: list[str], strict: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(line starts (N,) int64, image keys (I,) sorted, their (shard, offset, size) (I, 3) int64):
    from the cache while the files are unchanged, else one pass over the JSONL and one header scan
    of each shard (no image bytes), then cached (written atomically; a cache that cannot be read or
    written is rebuilt or skipped with a warning)."""
    path = cache_dir("index") / f"documents-{files_key(INDEX_VERSION, strict, files=[jsonl, *shards])}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["starts"], z["keys"], z["where"]
        except (OSError, ValueError, KeyError) as e:
            log.warning("rebuilding the document index: cannot read %s (%s)", path, e)
    starts = line_starts(jsonl)
    keys, where = [], array.array("q")          # flat (shard, offset, size) triples: no tuple per image
    for s, url in enumerate(shards):            # a shard's keys become numpy at once: no Python str per image
        names = []
        for ref in scan(url, strict):
            names.append(image_key(ref.key).encode("utf-8", "surrogateescape"))
            where.extend((s, ref.offset, ref.size))
        keys.append(np.array(names, dtype=np.bytes_))
    keys = np.concatenate(keys) if keys else np.array([], dtype=np.bytes_)
    order = np.argsort(keys, kind="stable")
    out = starts, keys[order], np.frombuffer(where, dtype=np.int64).reshape(-1, 3)[order]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, starts=out[0], keys=out[1], where=out[2])
        os.replace(tmp, path)
    except OSError as e:
        log.warning("document index not cached (%s): it is rebuilt at every start", e)
    return out


def parts(doc: dict, slots: list[int | None]) -> list:
    """The document in reading order: text segments (str) and image slots (int); image k of
    image_info sits just before text_list[matched_text_index] and takes slot slots[k] (None: left out)."""
    by_pos: dict[int, list[int]] = {}
    for im, s in zip(doc["image_info"], slots):
        if s is not None:
            by_pos.setdefault(im["matched_text_index"], []).append(s)
    out = []
    for i, t in enumerate(doc["text_list"]):
        out += by_pos.pop(i, []) + [t]
    return out + [s for p in sorted(by_pos) for s in by_pos[p]]    # an index past the last text: at the end


class InterleavedSet:
    """Documents of `jsonl` with their images in `shards` (see the module docstring)."""
    workers = -1
    eval_skipped = 0
    skipped = 0               # unreadable documents and images are found as it trains
    labels = None
    labelled = False
    text = True

    def __init__(self, jsonl: str, shards: list[str], channels: int, size: int, max_images: int = 4,
                 classes: list[str] | None = None, strict: bool = False, corpus: dict | None = None):
        from imagelm.data.sources import DatasetMissing

        self.jsonl, self.channels, self.size, self.strict = str(jsonl), channels, size, strict
        self.root = self.jsonl
        self.images_per_sample, self.classes, self.corpus = max_images, list(classes or []), corpus
        self.shard_urls = list(shards)
        self.starts, self.keys, self.where = _index(self.jsonl, self.shard_urls, strict)
        if not len(self.starts):
            raise DatasetMissing(f"no document in {self.jsonl}")
        self.images = ShardSet(list(shards), channels, size, self.classes, strict, counts=[0] * len(shards),
                               labelled=False)     # statistics and eval views read the images alone
        self.images.counts = np.bincount(self.where[:, 0], minlength=len(shards)).tolist()
        self.mean: list[float] = []
        self.std: list[float] = []
        self._pid, self._f, self._rd = -1, None, None

    def __len__(self) -> int:
        return len(self.starts)

    def __getstate__(self) -> dict:          # spawned workers open their own files
        return {**self.__dict__, "_pid": -1, "_f": None, "_rd": None}

    def _open(self) -> None:
        """Files of this process: a forked worker must not share the parent's file offsets."""
        if self._pid != os.getpid():
            self._pid, self._f, self._rd = os.getpid(), open(self.jsonl, "rb"), Reader()

    def document(self, j: int) -> tuple[dict | None, str]:
        self._open()
        self._f.seek(int(self.starts[j]))
        return parse(self._f.readline())

    def find(self, key: str) -> tuple[str, tuple[int, int]] | None:
        k = key.encode("utf-8", "surrogateescape")
        i = int(np.searchsorted(self.keys, k))
        if i == len(self.keys) or self.keys[i] != k:
            return None
        s, off, size = self.where[i].tolist()
        return self.shard_urls[s], (off, size)

    def place(self, j: int) -> str:
        """file:line of document j (counted on demand: only error messages need it)."""
        line, left = 1, int(self.starts[j])
        with open(self.jsonl, "rb") as f:
            while left > 0:
                b = f.read(min(left, 1 << 24))
                line, left = line + b.count(b"\n"), left - len(b)
        return f"{self.jsonl}:{line}"

    def sample_documents(self, n: int) -> list[list]:
        """Parts of about n documents spread over the file (images not read): the bounded text
        sample a tokenizer is trained on. A line that is not a document is left out (an error
        under data.strict)."""
        out = []
        for j in np.unique(np.linspace(0, len(self) - 1, min(n, len(self))).round().astype(np.int64)).tolist():
            d, why = self.document(j)
            if d is None and self.strict:
                raise DataError(f"{self.place(j)}: {why} (data.strict=true; false skips such lines and counts them)")
            if d is not None:
                k = min(len(d["image_info"]), self.images_per_sample)
                out.append(parts(d, list(range(k)) + [None] * (len(d["image_info"]) - k)))
        return out

    # --- per-sample work, in DataLoader workers -------------------------------------------------
    def train_sample(self, i: int, u: np.ndarray, cfg) -> tuple[np.ndarray | None, int, list | None, int, str]:
        """(images (J, C, S, S), label -1, parts, skipped, error) for document i; u: (J, 8) uniforms,
        one row an image slot. A line that is not a document is replaced by the next one; an image
        missing from the shards or undecodable is left out of its document; each counts as skipped,
        and under data.strict is the error (naming the file and line, or the document and image)."""
        self._open()
        J, S, C = self.images_per_sample, self.size, self.channels
        skipped = 0
        for k in range(REPLACE_TRIES):
            j = (i + k) % len(self)
            doc, why = self.document(j)
            if doc is None:
                if self.strict:
                    return None, -1, None, 1, f"{self.place(j)}: {why} (data.strict=true; false skips such lines " \
                                              f"and counts them)"
                skipped += 1
                continue
            x = np.zeros((J, C, S, S), np.uint8)
            slots: list[int | None] = []           # each image_info entry's slot (None: left out)
            placed = 0
            for im in doc["image_info"]:
                if placed == J:                      # the first J images the document has
                    slots.append(None)
                    continue
                found, err = self.find(image_key(im["image_name"])), ""
                if found is None:
                    err = "is not in the shards"
                else:
                    try:
                        x[placed] = train_view(self._rd.read(*found), C, S, u[placed], cfg.crop_scale,
                                               cfg.crop_ratio, cfg.flip, cfg.color_jitter)
                    except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt image
                        err = f"cannot be decoded ({e})"
                if err:
                    if self.strict:
                        return None, -1, None, skipped + 1, (f"image {im['image_name']} of document "
                                                             f"{doc.get('doc_id')} ({self.place(j)}) {err}")
                    skipped += 1
                    slots.append(None)
                    continue
                slots.append(placed)
                placed += 1
            return x, -1, parts(doc, slots), skipped, ""
        return None, -1, None, skipped, f"{REPLACE_TRIES} invalid documents in a row from {self.place(i)}"
