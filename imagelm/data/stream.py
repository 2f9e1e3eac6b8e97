"""Batches of a streamed dataset (image folder, WebDataset shards with or without captions,
interleaved documents) from DataLoader workers, with the in-memory loader's contract: `batch(step)`
is a function of the step, ranks take slices of one global batch, and the noise is drawn for the
global batch.

The randomness of step t is drawn for the global batch from a generator seeded by (seed, t): crop
uniforms per image, the method's noise and text uniforms per sample (`draws`), so a sample's crop
and text choices depend on (seed, step, position) only, never on which worker or rank made it.
A method's text transform (tokenizer, document layout) runs per sample in the worker.

Folders and documents (map-style): the order of epoch e is the in-memory loader's permutation,
and a worker makes whole local batches (steps s + w + kW). Shards: position i of the global batch
is sample i mod n of stream i // n's block of step t (S streams, n = batch / S, see
data/shards.py); worker w of a rank makes its contiguous part of the rank's positions every step,
reading the streams that part touches, and the main process joins the W parts. The batches are
thus the same for any ranks x workers, and resuming at step t skips each stream's first t*n
samples (whole epochs by the shard counts, then headers only)."""
from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

import numpy as np
import torch

from imagelm.data.documents import InterleavedSet
from imagelm.data.folder import REPLACE_TRIES, FolderSet
from imagelm.data.images import DataError
from imagelm.data.shards import Reader, ShardSet, scan
from imagelm.data.transforms import normalize

Streamed = FolderSet | ShardSet | InterleavedSet
TextTransform = Callable[[str | list, np.ndarray], dict[str, torch.Tensor]]
TEXT_DRAWS = 2            # uniforms per sample a text transform gets (e.g. where a caption's image goes)


def default_workers(world: int = 1) -> int:
    """Decoding processes per rank: the cores a rank has, less one for the training loop, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, world) - 1))


def draws(seed: int, step: int, global_batch: int, noise_dim: int, per: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step t's randomness for the global batch of `per` images a sample: (B*per, 8) uniforms for
    crops (5: transforms.crop_theta's) and jitter (3), the (B, noise_dim) noise, and (B, TEXT_DRAWS)
    text uniforms. One generator and draw order for the in-memory and streamed loaders."""
    g = torch.Generator().manual_seed((seed + 1) * 1_000_003 + step)
    crop = torch.rand(global_batch * per, 5, generator=g)
    noise = torch.rand(global_batch, noise_dim, generator=g)
    jit = torch.rand(global_batch * per, 3, generator=g)
    text = torch.rand(global_batch, TEXT_DRAWS, generator=g)
    return torch.cat([crop, jit], 1), noise, text


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    """(..., C, H, W) uint8 images -> one (B, ..., C, H, W) batch, written straight into shared
    memory in a worker (as default_collate does: no copy on the way to the main process)."""
    out = torch.empty(len(images), *images[0].shape, dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    np.stack(images, out=out.numpy())
    return out


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class _Plan:
    """What every worker needs to build its part of step t."""

    def __init__(self, data: Streamed, cfg, global_batch: int, seed: int, rank: int, world: int,
                 text: TextTransform | None):
        self.data, self.cfg, self.global_batch, self.seed, self.text = data, cfg, global_batch, seed, text
        self.rank, self.world, self.local = rank, world, global_batch // world
        self.mine = slice(rank * self.local, (rank + 1) * self.local)
        self.per = data.images_per_sample
        if isinstance(data, ShardSet):
            self.lanes = data.lanes(global_batch, cfg.streams)
            self.n = global_batch // self.lanes                                   # a stream's samples a step
            self.buffer = -(-max(0, data.shuffle_buffer) // self.lanes)           # the buffer is shared out

    def draws(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(B*per, 8) image uniforms and (B, TEXT_DRAWS) text uniforms of the global batch."""
        u, _, t = draws(self.seed, step, self.global_batch, 0, self.per)
        return u.numpy(), t.numpy()


class _Part:
    """One worker's samples of a step, collated into tensors."""

    def __init__(self, step: int):
        self.step, self.images, self.labels, self.extras, self.skipped = step, [], [], {}, 0

    def add(self, x: np.ndarray, y: int, extras: dict | None, skipped: int) -> None:
        self.images.append(x)
        self.labels.append(y)
        for k, v in (extras or {}).items():
            self.extras.setdefault(k, []).append(v)
        self.skipped += skipped

    def collate(self, error: str = "") -> dict:
        if error:
            return {"step": self.step, "error": error}
        return {"step": self.step, "image": _stack(self.images), "label": torch.tensor(self.labels, dtype=torch.int64),
                "extras": {k: torch.stack(v) for k, v in self.extras.items()}, "skipped": self.skipped, "error": ""}


def _text(p: _Plan, text, u: np.ndarray, where: str) -> tuple[dict | None, str]:
    """The method's tensors for a sample's text (a caption, or a document's parts)."""
    if p.text is None:
        return None, ""
    try:
        return p.text(text, u), ""
    except Exception as e:  # noqa: BLE001 - a text the transform cannot take is a corrupt sample
        return None, f"cannot read the text of {where}: {e}"


def _map_sample(p: _Plan, i: int, pos: int, u: np.ndarray, tu: np.ndarray) -> tuple:
    """(image, label, extras, skipped, error) of item i of a folder or document set at global position pos."""
    if isinstance(p.data, FolderSet):
        x, y, skipped, err = p.data.train_sample(i, u[pos], p.cfg)
        text = None
    else:
        x, y, text, skipped, err = p.data.train_sample(i, u[pos * p.per:(pos + 1) * p.per], p.cfg)
    if err:
        return None, -1, None, skipped, err
    extras, err = _text(p, text, tu[pos], f"document {i}")
    return x, y, extras, skipped, err


class MapSteps(torch.utils.data.Dataset):
    """Map-style (folders, documents): index = step -> this rank's local batch."""

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
        u, tu = p.draws(step)
        part = _Part(step)
        for pos, i in zip(range(p.mine.start, p.mine.stop), idx):
            x, y, extras, skipped, err = _map_sample(p, i, pos, u, tu)
            if err:
                return part.collate(err)
            part.add(x, y, extras, skipped)
        return part.collate()


def _shard_sample(p: _Plan, rd: Reader, ahead: list, k: int, u: np.ndarray, tu: np.ndarray) -> tuple:
    """(image, label, extras, skipped, error) of position k of a stream's block, `ahead` the block
    and the REPLACE_TRIES samples that follow it in the stream: a corrupt sample is replaced by the
    next readable one of the block (cyclic), then of those that follow (the same whoever reads it)."""
    n = len(ahead) - REPLACE_TRIES
    for j, ref in enumerate(ahead[k:n] + ahead[:k] + ahead[n:]):
        x, y, caption, err = p.data.train_sample(rd, ref, u, p.cfg, p.text is not None)
        if not err:
            extras, err = _text(p, caption, tu, f"sample {ref.key!r} in shard {ref.url}")
        if not err:
            return x, y, extras, int(j > 0), ""
        if p.data.strict:
            return None, -1, None, 1, err
    return None, -1, None, 1, (f"{len(ahead)} unreadable samples in a row in a shard stream (e.g. {ahead[k].key!r} "
                               f"in {ahead[k].url})")


class ShardSteps(torch.utils.data.IterableDataset):
    """Iterable: worker w of W makes, every step from `start` on, global positions [lo, hi) of this
    rank's slice (its w-th contiguous part), from the streams those positions fall in; a stream it
    shares with another worker or rank is read by both, each decoding only its own positions."""

    def __init__(self, plan: _Plan, start: int, workers: int):
        self.p, self.start, self.workers = plan, start, max(1, workers)

    def __iter__(self) -> Iterator[dict]:
        p = self.p
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, self.workers) if info is not None else (0, 1)
        lo, hi = p.mine.start + w * p.local // W, p.mine.start + (w + 1) * p.local // W
        n = p.n
        streams = {l: p.data.stream(l, p.lanes, p.seed, skip=self.start * n, buffer=p.buffer)
                   for l in range(lo // n, (hi - 1) // n + 1)}
        ahead = {l: collections.deque() for l in streams}          # a stream's next samples, read ahead
        rd = Reader(keep=len(streams) + 4)
        step = self.start
        while True:
            u, tu = p.draws(step)
            part, err = _Part(step), ""
            for l, it in streams.items():
                q = ahead[l]
                while len(q) < n + REPLACE_TRIES:
                    q.append(next(it))
                near = list(q)[:n + REPLACE_TRIES]
                for k in range(max(lo, l * n) - l * n, min(hi, (l + 1) * n) - l * n):
                    if err:
                        break
                    x, y, extras, skipped, err = _shard_sample(p, rd, near, k, u[l * n + k], tu[l * n + k])
                    if not err:
                        part.add(x, y, extras, skipped)
                for _ in range(n):
                    q.popleft()
            yield part.collate(err)
            step += 1


def _join(parts: list[dict], device: torch.device | None = None) -> dict:
    """The workers' parts of a step, in order, as one batch (on `device` when given: pinned parts
    travel there before they are joined)."""
    if device is not None:
        def to(x):
            return x.to(device, non_blocking=True)
        parts = [{**b, "image": to(b["image"]), "label": to(b["label"]),
                  "extras": {k: to(v) for k, v in b["extras"].items()}} for b in parts]
    if len(parts) == 1:
        return parts[0]
    return {"step": parts[0]["step"], "image": torch.cat([b["image"] for b in parts]),
            "label": torch.cat([b["label"] for b in parts]),
            "extras": {k: torch.cat([b["extras"][k] for b in parts]) for k in parts[0]["extras"]},
            "skipped": sum(b["skipped"] for b in parts), "error": ""}


_SIGWAITINFO = hasattr(signal, "sigwaitinfo")     # not on macOS: there torch's SIGTERM handling as it is


@contextlib.contextmanager
def _sigterm_held():
    """SIGTERM waits (is blocked in this thread) while loader workers are forked: they start with
    it blocked, threads they make before `_take_sigterm_from_parent_only` included."""
    if not _SIGWAITINFO:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)    # one sent meanwhile is delivered now


def _take_sigterm_from_parent_only(worker_id: int) -> None:
    """A cluster's preemption sends SIGTERM to every process of the job. torch's worker dies of one
    not sent by its parent, and the trainer then fails mid-step on a lost worker, before it can
    checkpoint. So a worker takes SIGTERM only from the trainer (which stops its workers with it, as
    torch's own handler assumes): blocked in every thread, it is read with its sender's pid here."""
    if not _SIGWAITINFO:
        return
    trainer = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})   # already, where the worker was forked

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
            pass
        os._exit(0)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()


class StreamLoader:
    """The trainer's loader for streamed data: `batch(step)` from worker processes that prefetch
    the following steps; asking for another step than the next restarts them there. `text`: the
    method's per-sample text transform (None: captions and documents' text are not read)."""

    def __init__(self, data: Streamed, data_cfg, global_batch: int, seed: int, noise_dim: int = 0,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu", workers: int | None = None,
                 text: TextTransform | None = None):
        if global_batch % world:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by the {world} ranks")
        if global_batch > len(data):
            raise ValueError(f"train.batch_size {global_batch} is larger than the dataset ({len(data)} samples)")
        self.data, self.cfg, self.seed, self.noise_dim, self.text = data, data_cfg, seed, noise_dim, text
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.local = global_batch // world
        self.device = torch.device(device)
        self.steps_per_epoch = len(data) // global_batch
        w = workers if workers is not None else data_cfg.workers if data_cfg.workers >= 0 else default_workers(world)
        self.workers = min(w, self.local)          # shards: a worker makes at least one position a step
        self.parts = max(1, self.workers) if isinstance(data, ShardSet) else 1      # items a step
        self.skipped: dict[int, int] = {}      # epoch -> corrupt samples replaced
        self._it, self._next = None, None

    def _start(self, step: int) -> None:
        plan = _Plan(self.data, self.cfg, self.global_batch, self.seed, self.rank, self.world, self.text)
        kw = dict(batch_size=None, num_workers=self.workers, pin_memory=self.device.type == "cuda")
        if self.workers:
            kw.update(prefetch_factor=self.cfg.prefetch, persistent_workers=False,
                      worker_init_fn=_take_sigterm_from_parent_only)
        if isinstance(self.data, ShardSet):
            dl = torch.utils.data.DataLoader(ShardSteps(plan, step, self.workers), **kw)
        else:
            dl = torch.utils.data.DataLoader(MapSteps(plan), sampler=range(step, 2 ** 62), **kw)
        with _sigterm_held():
            self._it = iter(dl)
        self._next = step

    def _parts(self, step: int) -> list[dict]:
        if self._it is None or step != self._next:
            self._start(step)
        parts = [next(self._it) for _ in range(self.parts)]
        self._next = step + 1
        for b in parts:
            if b["error"]:
                self._it = None
                raise DataError(b["error"])
            assert b["step"] == step, (b["step"], step)
        skipped = sum(b["skipped"] for b in parts)
        if skipped:
            e = step // self.steps_per_epoch
            self.skipped[e] = self.skipped.get(e, 0) + skipped
        return parts

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        d = self.device
        b = _join(self._parts(step), d)
        noise = draws(self.seed, step, self.global_batch, self.noise_dim, self.data.images_per_sample)[1]
        noise = noise[self.rank * self.local:(self.rank + 1) * self.local]
        images = normalize(b["image"], self.data.mean, self.data.std)
        return {"image": images, "label": b["label"], "noise": noise.to(d), **b["extras"]}

    def raw(self, step: int) -> dict:
        """The workers' batch for `step`: {"image": (b, [J,] C, S, S) uint8, "label", "extras": the
        text transform's tensors} on the CPU (pinned on CUDA when one worker makes it)."""
        return _join(self._parts(step))

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
    """plan: (shard, samples to read from its start, -1 = all); worker w reads plan[w::W]."""

    def __init__(self, data: ShardSet, batch: int, plan: list[tuple[str, int]]):
        self.data, self.batch, self.plan = data, batch, plan

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        rd, images, labels, texts, skipped = Reader(), [], [], [], 0
        for url, k in self.plan[w::W]:
            for n, ref in enumerate(scan(url, self.data.strict)):
                if n == k:
                    break
                x, y, text, err = self.data.eval_sample(rd, ref)
                if err:
                    if self.data.strict:
                        yield {"error": err}
                        return
                    skipped += 1
                    continue
                images.append(x)
                labels.append(y)
                texts.append(text)
                if len(images) == self.batch:
                    yield _eval_batch(images, labels, skipped, self.data, texts)
                    images, labels, texts, skipped = [], [], [], 0
        if images or skipped:
            yield _eval_batch(images, labels, skipped, self.data, texts)


def _eval_batch(images: list, labels: list, skipped: int, data: Streamed, texts: list | None = None) -> dict:
    C, S = data.channels, data.size
    return {"image": _stack(images) if images else torch.zeros(0, C, S, S, dtype=torch.uint8),
            "label": torch.tensor(labels, dtype=torch.int64), "text": texts if data.text else None,
            "skipped": skipped, "error": ""}


def _images_of(data: Streamed) -> FolderSet | ShardSet:
    """What eval and statistics read of a set: documents' images are those of their shards."""
    return data.images if isinstance(data, InterleavedSet) else data


def _eval_dicts(data: Streamed, batch: int, workers: int = -1, limit: int = 0, pin: bool = False) -> Iterator[dict]:
    data = _images_of(data)
    workers = default_workers() if workers < 0 else workers
    if isinstance(data, FolderSet):
        idx = np.arange(len(data))
        if limit and limit < len(data):      # a spread over the classes, the same every time
            idx = np.sort(epoch_order(len(data), 0, 0)[:limit].numpy())
        ds = _FolderEval(data, idx, batch)
        workers = min(workers, len(ds))
    else:                                    # a bounded sample: the first samples of shards spread over the set
        plan = data.spread(limit) if limit else [(u, -1) for u in data.urls]
        ds = _ShardEval(data, batch, plan)
        workers = min(workers, len(plan))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin)
    data.eval_skipped, n = 0, 0
    for b in dl:
        if b["error"]:
            raise DataError(b["error"])
        data.eval_skipped += b["skipped"]
        if limit and n >= limit:
            break
        if limit:
            b = {**b, "image": b["image"][:limit - n], "label": b["label"][:limit - n],
                 "text": b["text"][:limit - n] if b.get("text") is not None else None}
        n += len(b["image"])
        if len(b["image"]):
            yield b


def eval_batches(data: Streamed, batch: int, workers: int = -1, limit: int = 0,
                 pin: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (b, C, S, S) uint8, labels (b,)) over the dataset (or about `limit` images spread
    over it), resized and centre-cropped, decoded in worker processes. Skipped images are counted
    in data.eval_skipped."""
    for b in _eval_dicts(data, batch, workers, limit, pin):
        yield b["image"], b["label"]


STATS_IMAGES = 500       # images whose pixels give the per-channel mean and std of a streamed set


def sample(data: Streamed, n: int, workers: int = -1):
    """A bounded in-memory ImageData of n images (eval view; with their captions for image-text
    shards), for what needs pixels up front: the channel statistics, methods' prepare()
    (tokenizers, palettes), sample grids, image-text fine-tunes in eval."""
    from imagelm.data.sources import ImageData

    xs, ys, texts = [], [], []
    for b in _eval_dicts(data, 256, workers, limit=n):
        xs.append(b["image"])
        ys.append(b["label"])
        texts += b["text"] or []
    if not xs:
        raise DataError(f"no readable image in {data.root}")
    return ImageData(torch.cat(xs), torch.cat(ys), data.classes, _images_of(data).eval_skipped, mean=data.mean,
                     std=data.std, texts=texts if _images_of(data).text else None)


def fit_stats(data: Streamed, workers: int = -1) -> None:
    """data.mean / data.std per channel from STATS_IMAGES images (all of a smaller set)."""
    x = sample(data, STATS_IMAGES, workers).images
    f = x.float().div_(255).transpose(0, 1).reshape(x.shape[1], -1)
    data.mean, data.std = f.mean(1).tolist(), f.std(1).tolist()
