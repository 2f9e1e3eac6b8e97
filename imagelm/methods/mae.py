"""MAE: masked autoencoders (He et al. 2021, arXiv 2111.06377).

Mask 75% of the patches at random (shuffle by noise, keep the first 25%, restore order with the
inverse permutation); the encoder sees only the visible patches; a small decoder gets the encoded
visible tokens, mask tokens and positions and regresses the pixels; MSE on masked patches only,
against per-patch normalised pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from torch import nn

from imagelm.config import POSITIVE, RATIO, ModelConfig, Rule
from imagelm.methods.base import Method, Output, register
from imagelm.nn.embed import normalized_patches
from imagelm.nn.heads import MaskedDecoder
from imagelm.nn.vit import ViT


@dataclass
class MAEConfig:
    mask_ratio: Annotated[float, RATIO] = 0.75
    norm_pix: bool = True
    decoder_dim: Annotated[int, POSITIVE] = 512
    decoder_depth: Annotated[int, POSITIVE] = 8
    decoder_heads: Annotated[int, POSITIVE] = 16
    # Ablation (BEiT/SimMIM style): the encoder sees the full sequence with a [MASK] embedding at
    # masked positions. Same loss; ~3x the encoder compute at 75% masking.
    encode_mask_tokens: bool = False
    RULES: ClassVar[tuple[Rule, ...]] = (
        (lambda c: c.decoder_dim % c.decoder_heads == 0, "{w}decoder_dim must be a multiple of {w}decoder_heads"),
        (lambda c: c.decoder_dim % 4 == 0, "{w}decoder_dim must be a multiple of 4 (2-D sin-cos positions)"),)


def random_masking(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """noise (B, K) -> ids_keep (B, keep), ids_restore (B, K), mask (B, K) with 1 = masked, in
    the original patch order. The lowest-noise patches are kept."""
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones_like(noise)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, mask.gather(1, ids_restore)


@register("mae")
class MAE(Method):
    Config = MAEConfig
    # `imagelm bench` times this variant against the config: the visible-only encoder's speedup
    bench_ablations = {"visible_only_speedup": {"encode_mask_tokens": True}}

    def __init__(self, model: ModelConfig, cfg: MAEConfig):
        super().__init__()
        if not 0 < cfg.mask_ratio < 1:
            raise ValueError(f"mae.mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        self.cfg, self.p = cfg, model.patch_size
        self.encoder = ViT(model)
        K = self.encoder.num_patches
        self.noise_dim = K
        self.keep = max(1, int(K * (1 - cfg.mask_ratio)))
        self.decoder = MaskedDecoder(model.dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                                     self.encoder.grid, self.p * self.p * model.in_chans, model.norm_eps)
        if cfg.encode_mask_tokens:
            self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, model.dim))
            nn.init.normal_(self.enc_mask_token, std=0.02)

    def mask(self, noise: torch.Tensor):
        return random_masking(noise, self.keep)

    def encode(self, images: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Visible patches only: (B, keep, D). Under the ablation, the whole sequence with
        [MASK] embeddings at masked positions, then the visible outputs are taken."""
        x = self.encoder.embed(images)                                        # (B, K, D)
        if self.cfg.encode_mask_tokens:
            tok = self.enc_mask_token + self.encoder.pos_embed
            x = self.encoder(torch.where(mask[..., None].bool(), tok.to(x.dtype), x))
            return x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))      # (B, keep, D)
        return self.encoder(x)

    def decode(self, z: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, keep, D) -> pixel predictions for every patch (B, K, p*p*C)."""
        return self.decoder(z, ids_restore)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE over masked patches only (every image has the same number masked)."""
        err = (pred.float() - target).pow(2).mean(dim=-1)                    # (B, K)
        return (err * mask).sum() / mask.sum()

    def forward(self, batch: dict) -> Output:
        images = batch["image"]
        ids_keep, ids_restore, mask = self.mask(batch["noise"])
        pred = self.decode(self.encode(images, ids_keep, mask), ids_restore)
        return Output(self.loss(pred, normalized_patches(images, self.p, self.cfg.norm_pix), mask))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor):
        """(prediction in pixel space, mask): normalised predictions are mapped back with each
        patch's own mean and std, as the MAE reference visualisation does."""
        ids_keep, ids_restore, mask = self.mask(noise)
        pred = self.decode(self.encode(images, ids_keep, mask), ids_restore).float()
        if self.cfg.norm_pix:
            x = normalized_patches(images, self.p, False)
            pred = pred * (x.var(-1, keepdim=True) + 1e-6) ** 0.5 + x.mean(-1, keepdim=True)
        return pred, mask
