"""Batches for training: a pure function of the step number, so resuming at step t replays
exactly what an uninterrupted run would have seen, and any number of ranks see slices of one
global batch (image order, augmentation and the method's noise are drawn for the global batch)."""
from __future__ import annotations

import torch

from imagelm.data.sources import ImageData
from imagelm.data.transforms import crop_params, normalize, random_resized_crop


class BatchLoader:
    def __init__(self, data: ImageData, data_cfg, global_batch: int, seed: int, noise_dim: int = 0,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        if global_batch % world:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by the {world} ranks")
        if global_batch > len(data):
            raise ValueError(f"train.batch_size {global_batch} is larger than the dataset ({len(data)} images)")
        self.data, self.cfg, self.seed = data, data_cfg, seed
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
        per = self.data.images[0].numel() // self.data.images.shape[-3:].numel()     # images per sample
        g = torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + step)
        theta = crop_params(self.global_batch * per, self.cfg.crop_scale, self.cfg.crop_ratio, self.cfg.flip, g)
        noise = torch.rand(self.global_batch, self.noise_dim, generator=g)
        mine = slice(self.rank * self.local, (self.rank + 1) * self.local)
        d = self.device
        raw = self.data.images[idx[mine]].to(d)                                     # (b, [J,] C, H, W)
        images = normalize(raw.flatten(0, -4), self.data.mean, self.data.std)
        images = random_resized_crop(images, theta[mine.start * per:mine.stop * per].to(d)).view(raw.shape)
        extras = {k: v[idx[mine]].to(d) for k, v in self.data.extras.items()}
        return {"image": images, "label": self.data.labels[idx[mine]].to(d), "noise": noise[mine].to(d), **extras}

    def close(self) -> None:
        pass


def make_loader(data, data_cfg, global_batch: int, seed: int, noise_dim: int = 0, rank: int = 0, world: int = 1,
                device: torch.device | str = "cpu"):
    """The loader for any dataset: in memory (BatchLoader, augmentation on the device) or streamed
    from disk (StreamLoader, decoding in worker processes). Both answer batch(step) alike."""
    if isinstance(data, ImageData):
        return BatchLoader(data, data_cfg, global_batch, seed, noise_dim, rank, world, device)
    from imagelm.data.stream import StreamLoader
    return StreamLoader(data, data_cfg, global_batch, seed, noise_dim, rank, world, device)
