"""Batches for training: a pure function of the step number, so resuming at step t replays
exactly what an uninterrupted run would have seen, and any number of ranks see slices of one
global batch (image order, augmentation, the method's noise and text choices are drawn for the
global batch)."""
from __future__ import annotations

import torch

from imagelm.data.sources import ImageData
from imagelm.data.stream import TextTransform, draws
from imagelm.data.transforms import crop_theta, normalize, random_resized_crop


class BatchLoader:
    """An in-memory set, augmented on the device. `text`: the method's per-sample text transform,
    applied to each sample's caption (data.texts) as the streamed loader's workers do."""

    def __init__(self, data: ImageData, data_cfg, global_batch: int, seed: int, noise_dim: int = 0,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu", text: TextTransform | None = None):
        if global_batch % world:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by the {world} ranks")
        if global_batch > len(data):
            raise ValueError(f"train.batch_size {global_batch} is larger than the dataset ({len(data)} images)")
        self.data, self.cfg, self.seed, self.text = data, data_cfg, seed, text if data.texts is not None else None
        self.global_batch, self.noise_dim, self.rank, self.world = global_batch, noise_dim, rank, world
        self.local = global_batch // world
        self.device = torch.device(device)    # uint8 images travel, augmentation runs there
        self.steps_per_epoch = len(data) // global_batch     # the last partial batch is dropped
        self._perm_epoch, self._perm = -1, None
        self.skipped: dict[int, int] = {}     # epoch -> unreadable samples (none: read before training)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data), generator=g), epoch
        return self._perm

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """A sample is an image (N, C, H, W data) or several (N, J, C, H, W: documents); each
        image gets its own crop."""
        epoch, j = divmod(step, self.steps_per_epoch)
        idx = self._order(epoch)[j * self.global_batch:(j + 1) * self.global_batch]
        per = self.data.images_per_sample
        u, noise, tu = draws(self.seed, step, self.global_batch, self.noise_dim, per)
        theta = crop_theta(u[:, :5], self.cfg.crop_scale, self.cfg.crop_ratio, self.cfg.flip)
        mine = slice(self.rank * self.local, (self.rank + 1) * self.local)
        d = self.device
        raw = self.data.images[idx[mine]].to(d)                                     # (b, [J,] C, H, W)
        images = normalize(raw.flatten(0, -4), self.data.mean, self.data.std)
        images = random_resized_crop(images, theta[mine.start * per:mine.stop * per].to(d)).view(raw.shape)
        extras = {k: v[idx[mine]].to(d) for k, v in self.data.extras.items()}
        if self.text is not None:
            out = [self.text(self.data.texts[i], t) for i, t in zip(idx[mine].tolist(), tu[mine].numpy())]
            extras.update({k: torch.stack([o[k] for o in out]).to(d) for k in out[0]})
        return {"image": images, "label": self.data.labels[idx[mine]].to(d), "noise": noise[mine].to(d), **extras}

    def close(self) -> None:
        pass


def make_loader(data, data_cfg, global_batch: int, seed: int, noise_dim: int = 0, rank: int = 0, world: int = 1,
                device: torch.device | str = "cpu", text: TextTransform | None = None):
    """The loader for any dataset: in memory (BatchLoader, augmentation on the device) or streamed
    from disk (StreamLoader, decoding and text transforms in worker processes). Both answer
    batch(step) alike."""
    if isinstance(data, ImageData):
        return BatchLoader(data, data_cfg, global_batch, seed, noise_dim, rank, world, device, text)
    from imagelm.data.stream import StreamLoader
    return StreamLoader(data, data_cfg, global_batch, seed, noise_dim, rank, world, device, text=text)
