"""Batches of a streamed dataset (image folder or WebDataset shards) from DataLoader workers, with
the in-memory loader's contract: `batch(step)` is a function of the step, ranks take slices of
one global batch, and the noise is drawn for the global batch.

A worker builds a whole local batch per step: the images (decoded, cropped, flipped there) and
labels. Crop uniforms come from a generator seeded by the step, drawn for the global batch, so a
sample's crop depends on (seed, step, position) only. Folders: the order of epoch e is the
in-memory loader's permutation, so a folder streams the same samples as the in-memory path.
Shards: see data/shards.py (the order depends on ranks x workers; resume with the same ones)."""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from imagelm.data.folder import FolderSet
from imagelm.data.images import DataError
from imagelm.data.shards import Reader, ShardSet
from imagelm.data.transforms import normalize

Streamed = FolderSet | ShardSet


def default_workers(world: int = 1) -> int:
    """Decoding processes per rank: the cores a rank has, less one for the training loop, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, world) - 1))


def draws(seed: int, step: int, global_batch: int, noise_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(global_batch, 8) uniforms for crops (5: the in-memory loader's crop draws) and jitter (3),
    and the (global_batch, noise_dim) noise: BatchLoader's generator and draw order."""
    g = torch.Generator().manual_seed((seed + 1) * 1_000_003 + step)
    crop = torch.rand(global_batch, 5, generator=g)
    noise = torch.rand(global_batch, noise_dim, generator=g)
    jit = torch.rand(global_batch, 3, generator=g)
    return torch.cat([crop, jit], 1), noise


def _chw(images: list[np.ndarray]) -> torch.Tensor:
    """(H, W, C) uint8 images -> one (B, C, H, W) batch, written straight into shared memory in a
    worker (as default_collate does: no copy on the way to the main process), each image by one
    numpy transpose copy (torch's strided uint8 copies are ~10x slower)."""
    H, W, C = images[0].shape
    out = torch.empty(len(images), C, H, W, dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    a = out.numpy()
    for i, x in enumerate(images):
        a[i] = x.transpose(2, 0, 1)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class _Plan:
    """What every worker needs to build step t's local batch."""

    def __init__(self, data: Streamed, cfg, global_batch: int, seed: int, rank: int, world: int):
        self.data, self.cfg, self.global_batch, self.seed = data, cfg, global_batch, seed
        self.rank, self.world, self.local = rank, world, global_batch // world
        self.mine = slice(rank * self.local, (rank + 1) * self.local)

    def uniforms(self, step: int) -> np.ndarray:
        return draws(self.seed, step, self.global_batch, 0)[0][self.mine].numpy()


def _collate(step: int, images: list, labels: list, skipped: int, error: str) -> dict:
    if error:
        return {"step": step, "error": error}
    return {"step": step, "image": _chw(images), "label": torch.tensor(labels, dtype=torch.int64),
            "skipped": skipped, "error": ""}


class FolderSteps(torch.utils.data.Dataset):
    """Map-style: index = step -> this rank's local batch."""

    def __init__(self, plan: _Plan):
        self.p = plan
        self.spe = len(plan.data) // plan.global_batch
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, step: int) -> dict:
        p = self.p
        epoch, j = divmod(step, self.spe)
        if epoch != self._epoch:
            self._perm, self._epoch = epoch_order(len(p.data), p.seed, epoch), epoch
        idx = self._perm[j * p.global_batch:(j + 1) * p.global_batch][p.mine].tolist()
        images, labels, skipped = [], [], 0
        for i, u in zip(idx, p.uniforms(step)):
            x, y, s, err = p.data.train_sample(i, u, p.cfg)
            if err:
                return _collate(step, [], [], 0, err)
            images.append(x)
            labels.append(y)
            skipped += s
        return _collate(step, images, labels, skipped, "")


class ShardSteps(torch.utils.data.IterableDataset):
    """Iterable: DataLoader worker w of W, started at step s, makes steps s + w + k*W, as reader
    (s + w) mod W of this rank; its k-th batch is the next `local` samples of that reader's stream.
    Starting at s, the reader skips the samples of the batches it made before s: whole epochs by
    the shard counts, then headers only."""

    def __init__(self, plan: _Plan, start: int, workers: int):
        self.p, self.start, self.workers = plan, start, max(1, workers)

    def __iter__(self) -> Iterator[dict]:
        p, W = self.p, self.workers
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        step = self.start + w
        if info is None:     # no worker processes: one reader makes every step
            step, W = self.start, 1
        lane = step % W
        stream = p.data.stream(p.rank * W + lane, p.world * W, p.seed, skip=(step // W) * p.local)
        rd = Reader()
        while True:
            refs = [next(stream) for _ in range(p.local)]
            images, labels, bad, err = [], [], [], ""
            for ref, u in zip(refs, p.uniforms(step)):
                x, y, e = p.data.train_sample(rd, ref, u, p.cfg)
                if e and p.data.strict:
                    err = e
                    break
                images.append(x)
                labels.append(y)
                if x is None:
                    bad.append(len(images) - 1)
            good = [i for i in range(len(images)) if images[i] is not None]
            if not err and bad:
                if not good:
                    err = f"every sample of a batch is unreadable (e.g. {refs[0].key!r} in {refs[0].url})"
                for k, i in enumerate(bad):     # a corrupt sample: another of the batch, decoded again
                    if err:
                        break
                    src = refs[good[k % len(good)]]
                    x, y, e = p.data.train_sample(rd, src, p.uniforms(step)[i], p.cfg)
                    images[i], labels[i] = x, y
            yield _collate(step, images, labels, len(bad), err)
            step += W


class StreamLoader:
    """The trainer's loader for streamed data: `batch(step)` from worker processes that prefetch
    the following steps; asking for another step than the next restarts them there."""

    def __init__(self, data: Streamed, data_cfg, global_batch: int, seed: int, noise_dim: int = 0,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu", workers: int | None = None):
        if global_batch % world:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by the {world} ranks")
        if global_batch > len(data):
            raise ValueError(f"train.batch_size {global_batch} is larger than the dataset ({len(data)} images)")
        self.data, self.cfg, self.seed, self.noise_dim = data, data_cfg, seed, noise_dim
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.local = global_batch // world
        self.device = torch.device(device)
        self.steps_per_epoch = len(data) // global_batch
        w = data_cfg.workers if data_cfg.workers >= 0 else default_workers(world)
        if isinstance(data, ShardSet) and w * world > len(data.urls):   # every reader needs a shard
            w = max(0, len(data.urls) // world)
            if w == 0 and world > len(data.urls):
                raise DataError(f"{len(data.urls)} shards cannot feed {world} ranks: write at least one per rank")
        self.workers = w
        self.skipped: dict[int, int] = {}      # epoch -> corrupt samples replaced
        self._it, self._next = None, None

    def _start(self, step: int) -> None:
        plan = _Plan(self.data, self.cfg, self.global_batch, self.seed, self.rank, self.world)
        kw = dict(batch_size=None, num_workers=self.workers, pin_memory=self.device.type == "cuda")
        if self.workers:
            kw.update(prefetch_factor=self.cfg.prefetch, persistent_workers=False)
        if isinstance(self.data, FolderSet):
            dl = torch.utils.data.DataLoader(FolderSteps(plan), sampler=range(step, 2 ** 62), **kw)
        else:
            dl = torch.utils.data.DataLoader(ShardSteps(plan, step, self.workers), **kw)
        self._it, self._next = iter(dl), step

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        b = self.raw(step)
        noise = draws(self.seed, step, self.global_batch, self.noise_dim)[1][self.rank * self.local:
                                                                           (self.rank + 1) * self.local]
        d = self.device
        images = normalize(b["image"].to(d, non_blocking=True), self.data.mean, self.data.std)
        return {"image": images, "label": b["label"].to(d, non_blocking=True), "noise": noise.to(d)}

    def raw(self, step: int) -> dict:
        """The workers' batch for `step`: {"image": (b, C, S, S) uint8 (pinned on CUDA), "label"}."""
        if self._it is None or step != self._next:
            self._start(step)
        b = next(self._it)
        self._next = step + 1
        if b["error"]:
            self._it = None
            raise DataError(b["error"])
        assert b["step"] == step, (b["step"], step)
        if b["skipped"]:
            e = step // self.steps_per_epoch
            self.skipped[e] = self.skipped.get(e, 0) + b["skipped"]
        return b

    def close(self) -> None:
        self._it = None


# ----------------------------------------------------------------------------- eval / statistics

class _FolderEval(torch.utils.data.Dataset):
    def __init__(self, data: FolderSet, idx: np.ndarray, batch: int):
        self.data, self.idx, self.batch = data, idx, batch

    def __len__(self) -> int:
        return -(-len(self.idx) // self.batch)

    def __getitem__(self, b: int) -> dict:
        images, labels, skipped = [], [], 0
        for i in self.idx[b * self.batch:(b + 1) * self.batch].tolist():
            x, err = self.data.eval_sample(i)
            if err:
                if self.data.strict:
                    return {"error": err}
                skipped += 1
                continue
            images.append(x)
            labels.append(int(self.data.labels[i]))
        return _eval_batch(images, labels, skipped, self.data)


class _ShardEval(torch.utils.data.IterableDataset):
    def __init__(self, data: ShardSet, batch: int, limit: int):
        self.data, self.batch, self.limit = data, batch, limit

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        rd, images, labels, skipped, n = Reader(), [], [], 0, 0
        for u in self.data.urls[w::W]:
            for ref in _scan(self.data, u):
                if self.limit and n >= self.limit:
                    break
                x, y, err = self.data.eval_sample(rd, ref)
                if err:
                    if self.data.strict:
                        yield {"error": err}
                        return
                    skipped += 1
                    continue
                images.append(x)
                labels.append(y)
                n += 1
                if len(images) == self.batch:
                    yield _eval_batch(images, labels, skipped, self.data)
                    images, labels, skipped = [], [], 0
        if images or skipped:
            yield _eval_batch(images, labels, skipped, self.data)


def _scan(data: ShardSet, url: str):
    from imagelm.data.shards import scan
    return scan(url, data.strict)


def _eval_batch(images: list, labels: list, skipped: int, data: Streamed) -> dict:
    C, S = data.channels, data.size
    return {"image": _chw(images) if images else torch.zeros(0, C, S, S, dtype=torch.uint8),
            "label": torch.tensor(labels, dtype=torch.int64), "skipped": skipped, "error": ""}


def eval_batches(data: Streamed, batch: int, workers: int = -1, limit: int = 0,
                 pin: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (b, C, S, S) uint8, labels (b,)) over the dataset (or its first `limit` images, a
    spread of them for folders), resized and centre-cropped, decoded in worker processes. Skipped
    images are counted in data.eval_skipped."""
    workers = default_workers() if workers < 0 else workers
    if isinstance(data, FolderSet):
        idx = np.arange(len(data))
        if limit and limit < len(data):      # a spread over the classes, the same every time
            idx = np.sort(epoch_order(len(data), 0, 0)[:limit].numpy())
        ds = _FolderEval(data, idx, batch)
        workers = min(workers, len(ds))
    else:
        ds = _ShardEval(data, batch, limit if workers <= 1 else 0)
        workers = min(workers, len(data.urls))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin)
    data.eval_skipped, n = 0, 0
    for b in dl:
        if b["error"]:
            raise DataError(b["error"])
        data.eval_skipped += b["skipped"]
        if limit and n >= limit:
            break
        x, y = b["image"], b["label"]
        if limit:
            x, y = x[:limit - n], y[:limit - n]
        n += len(x)
        if len(x):
            yield x, y


STATS_IMAGES = 500       # images whose pixels give the per-channel mean and std of a streamed set


def sample(data: Streamed, n: int, workers: int = -1):
    """A bounded in-memory ImageData of n images (eval view), for what needs pixels up front: the
    channel statistics, methods' prepare() (tokenizers, palettes), sample grids."""
    from imagelm.data.sources import ImageData

    xs, ys = [], []
    for x, y in eval_batches(data, 256, workers, limit=n):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise DataError(f"no readable image in {data.root}")
    return ImageData(torch.cat(xs), torch.cat(ys), data.classes, data.eval_skipped, mean=data.mean, std=data.std)


def fit_stats(data: Streamed, workers: int = -1) -> None:
    """data.mean / data.std per channel from STATS_IMAGES images (all of a smaller set)."""
    x = sample(data, STATS_IMAGES, workers).images
    f = x.float().div_(255).transpose(0, 1).reshape(x.shape[1], -1)
    data.mean, data.std = f.mean(1).tolist(), f.std(1).tolist()
