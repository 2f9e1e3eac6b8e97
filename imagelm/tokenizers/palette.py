"""iGPT's colour palette: k-means over pixel values (RGB, or intensity for grey images) turns
each pixel into one of `size` tokens (paper: 512 colours = 9 bits), after an optional area
downsampling to `resolution` x `resolution` (paper: 32 x 32 and smaller)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagelm.tokenizers.visual import kmeans, nearest


class Palette(nn.Module):
    def __init__(self, size: int, channels: int, resolution: int):
        super().__init__()
        self.size, self.channels, self.resolution = size, channels, resolution
        self.register_buffer("colours", torch.zeros(size, channels))    # (V, C), in input units

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, r*r, C) pixels in raster order, area-downsampled to r x r."""
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images.float(), size=(self.resolution,) * 2, mode="area")
        return images.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, max_pixels: int = 100_000, seed: int = 0) -> "Palette":
        """k-means on (a sample of) the pixels of (N, C, H, W) images."""
        g = torch.Generator().manual_seed(seed)
        px = torch.cat([self.pixels(b) for b in images.split(4096)]).reshape(-1, self.channels)
        px = px[torch.randperm(len(px), generator=g)[:max_pixels]]
        c = kmeans(px, self.size, seed=seed)
        order = c.sum(1).argsort()                  # dark -> light, so token ids read like intensities
        self.colours.copy_(c[order])
        return self

    @torch.no_grad()
    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, r*r) nearest-colour ids, in fp32 even under autocast (bf16 distances
        would hand ~3% of the pixels another colour)."""
        with torch.autocast(images.device.type, enabled=False):
            return nearest(self.pixels(images.float()), self.colours)                 # (B, N, C) -> (B, N)

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, r*r) ids -> (B, C, r, r) images in input units."""
        B = tokens.shape[0]
        return self.colours[tokens].transpose(1, 2).reshape(B, self.channels, self.resolution, self.resolution)

    def usage(self, tokens: torch.Tensor) -> float:
        return torch.bincount(tokens.flatten(), minlength=self.size).gt(0).float().mean().item()
