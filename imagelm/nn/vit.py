"""The image encoder every method trains and every probe reads: patch embedding + sin-cos
positions + the shared Transformer, with one downstream API, `features(images, layers)`."""
from __future__ import annotations

import torch
from torch import nn

from imagelm.config import ModelConfig
from imagelm.nn.embed import PatchEmbed, sincos_2d
from imagelm.nn.transformer import Transformer


class ViT(nn.Module):
    def __init__(self, cfg: ModelConfig, multiway: bool = False, vl_layers: int = 0):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"model.img_size {cfg.img_size} is not a multiple of model.patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.patch_size
        self.num_patches = self.grid ** 2
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim, bias=True)
        self.register_buffer("pos_embed", sincos_2d(cfg.dim, self.grid, self.grid), persistent=False)  # (K, D)
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.bias, cfg.norm_eps,
                                       multiway, vl_layers)
        self.apply(_init_weights)

    @property
    def num_layers(self) -> int:
        return len(self.transformer.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K, D) patch tokens with their positions, raster order."""
        return self.patch_embed(images) + self.pos_embed

    def forward(self, tokens: torch.Tensor, mask=None, is_causal: bool = False, modality=None,
                fuse: bool = False) -> torch.Tensor:
        """Embedded tokens (B, N, D) -> final normed tokens (B, N, D); modality/fuse route the
        tokens of a Multiway encoder (None: all through the vision experts, the plain ViT)."""
        return self.transformer(tokens, mask, is_causal, modality=modality, fuse=fuse)

    def features(self, images: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Per-layer patch features for downstream use, bidirectional attention.

        layers: 0 = embeddings, i = output of block i (default: the last block); each (B, K, D).
        The last block's output is returned before the final norm; pooling is the probe's job."""
        layers = layers or [self.num_layers]
        return self.transformer(self.embed(images), layers=layers)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)   # as MAE/timm ViTs: uniform Xavier for every linear
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
