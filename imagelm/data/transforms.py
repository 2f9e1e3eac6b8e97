"""Augmentations applied to whole batches of tensors: one grid_sample call per batch instead of
per-image Python, so two cores are spent on the model, not on the data."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_params(n: int, scale: tuple[float, float], ratio: tuple[float, float], flip: bool,
                generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine matrices in normalised coordinates: a random area fraction in `scale` at
    an aspect ratio in `ratio` (log-uniform), placed uniformly inside the image, mirrored with p=0.5."""
    return crop_theta(torch.rand(n, 5, generator=generator), scale, ratio, flip)


def crop_theta(u: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], flip: bool) -> torch.Tensor:
    """crop_params from given uniforms u (n, 5)."""
    n = len(u)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)       # crop size as a fraction of the side
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)                      # centre in [-1, 1] keeping the crop inside
    cy = (1 - h) * (2 * u[:, 3] - 1)
    sx = torch.where((u[:, 4] < 0.5) & flip, -w, w)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    return theta


def random_resized_crop(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Float images (B, C, H, W), affine params (B, 2, 3) -> crops resized back to (H, W), bilinear."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalize(images_u8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, standardised per channel: x / (255 s) - m / s. In place after
    the conversion: a broadcasting op that allocates its output (addcmul) takes twice as long on CPU."""
    s = torch.tensor(std, device=images_u8.device).view(1, -1, 1, 1)
    m = torch.tensor(mean, device=images_u8.device).view(1, -1, 1, 1)
    return images_u8.float().mul_(1 / (255 * s)).sub_(m / s)
