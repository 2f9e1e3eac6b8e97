"""Patchify/unpatchify, the patch embedding and fixed 2-D sin-cos positions."""
from __future__ import annotations

import torch
from torch import nn

from imagelm.errors import ConfigError


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, p*p*C), K = (H/p)(W/p) in raster order; pixels inside a patch are (p, p, C)."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, p: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, K, p*p*C) -> (B, C, H, W); the inverse of `patchify`."""
    B, K, _ = patches.shape
    h, w = grid if grid else (int(K ** 0.5),) * 2
    x = patches.reshape(B, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * p, w * p)


def normalized_patches(images: torch.Tensor, p: int, norm_pix: bool = True) -> torch.Tensor:
    """Pixel targets (B, K, p*p*C); with norm_pix each patch is normalised by its own mean and
    variance, (x - mu) / sqrt(var + 1e-6), as AIM and MAE regress."""
    x = patchify(images, p)
    return normalize_rows(x) if norm_pix else x


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Each vector over the last dim by its own mean and variance: (x - mu) / sqrt(var + 1e-6)."""
    mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + 1e-6) ** 0.5


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) [sin | cos] with MAE/Transformer frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """(h*w, dim) fixed 2-D positions: half the channels encode the row, half the column."""
    if dim % 4:
        raise ConfigError(f"a width of {dim} cannot hold 2-D sin-cos positions: model.dim (and a decoder's dim) "
                          f"must be a multiple of 4")
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, ys.flatten()), sincos_1d(dim // 2, xs.flatten())], dim=1)


class PatchEmbed(nn.Module):
    """Linear projection of flattened patches (equal to a stride-p conv, but on patchified input)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size * in_chans, dim, bias=bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(images, self.patch_size))  # (B, K, D)
