"""AIM: autoregressive image models (El-Nouby et al. 2024, arXiv 2401.08541).

Patches in a fixed order; prefix-causal attention (a random prefix of S patches is seen
bidirectionally, the rest causally); position i regresses patch i+1 through a per-patch MLP head;
the loss covers only patches after the prefix, against per-patch normalised pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagelm.config import NON_NEGATIVE, POSITIVE, ModelConfig
from imagelm.methods.base import Method, Output, register
from imagelm.nn.embed import normalized_patches
from imagelm.nn.heads import ResidualMLPHead
from imagelm.nn.transformer import attention_mask
from imagelm.nn.vit import ViT
from imagelm.tokenizers.visual import TokenTargets, VisualTokenizer, prepare_tokenizer


@dataclass
class AIMConfig(TokenTargets):
    prefix: bool = True          # prefix-causal (paper); false = plain causal
    order: Literal["raster", "spiral", "checkerboard", "random"] = "raster"
    norm_pix: bool = True        # per-patch normalised targets; false = raw-pixel MSE
    loss: Literal["mse", "token_ce"] = "mse"   # token_ce: cross-entropy on visual-token codes
    head_depth: Annotated[int, NON_NEGATIVE] = 12
    head_width: Annotated[int, POSITIVE] = 2048


def patch_order(kind: str, grid: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The order patches are predicted in, as raster indices: (K,) or (B, K) for 'random'."""
    K = grid * grid
    if kind == "raster":
        return torch.arange(K)
    if kind == "checkerboard":   # one colour of the board in raster order, then the other
        idx = torch.arange(K)
        black = (idx // grid + idx % grid) % 2 == 0
        return torch.cat([idx[black], idx[~black]])
    if kind == "spiral":         # clockwise from the top-left corner inwards
        order, top, left, bottom, right = [], 0, 0, grid - 1, grid - 1
        while top <= bottom and left <= right:
            order += [top * grid + c for c in range(left, right + 1)]
            order += [r * grid + right for r in range(top + 1, bottom + 1)]
            if top < bottom:
                order += [bottom * grid + c for c in range(right - 1, left - 1, -1)]
            if left < right:
                order += [r * grid + left for r in range(bottom - 1, top, -1)]
            top, left, bottom, right = top + 1, left + 1, bottom - 1, right - 1
        return torch.tensor(order)
    if kind == "random":         # a fresh permutation per image
        return noise.argsort(dim=1)
    raise ValueError(f"unknown patch order {kind!r}")


@register("aim")
class AIM(Method):
    Config = AIMConfig

    def __init__(self, model: ModelConfig, cfg: AIMConfig):
        super().__init__()
        self.cfg, self.p = cfg, model.patch_size
        self.encoder = ViT(model)
        K = self.encoder.num_patches
        self.noise_dim = 1 + K    # prefix length, then the per-image order for order=random
        out_dim = cfg.vocab if cfg.loss == "token_ce" else self.p * self.p * model.in_chans
        self.head = ResidualMLPHead(model.dim, out_dim, cfg.head_depth, cfg.head_width, model.bias, model.norm_eps)
        if cfg.loss == "token_ce":
            self.tokenizer = VisualTokenizer(cfg.tokenizer_config(model))
            self.tokenizer.requires_grad_(False)
        if cfg.order != "random":
            self.register_buffer("order", patch_order(cfg.order, self.encoder.grid), persistent=False)

    def prepare(self, data, run_dir, log=print) -> None:
        if self.cfg.loss == "token_ce":
            prepare_tokenizer(self.tokenizer, self.cfg, data, run_dir, log)

    # --- the method, step by step -------------------------------------------------------------
    def sample_order(self, noise: torch.Tensor) -> torch.Tensor:
        """(B, K) raster index of the patch at each sequence position."""
        if self.cfg.order == "random":
            return patch_order("random", self.encoder.grid, noise[:, 1:])
        return self.order.expand(noise.shape[0], -1)

    def sample_prefix(self, noise: torch.Tensor) -> torch.Tensor:
        """S ~ U{1, ..., K-1} per image; 0 (no prefix) for plain causal attention."""
        K = self.encoder.num_patches
        if not self.cfg.prefix:
            return torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)
        return 1 + (noise[:, 0] * (K - 1)).long().clamp_(max=K - 2)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, p*p*C) patches, each normalised by its own mean and variance (norm_pix), or
        (B, K, 1) visual-token codes for token_ce."""
        if self.cfg.loss == "token_ce":
            return self.tokenizer.encode(images)[..., None]
        return normalized_patches(images, self.p, self.cfg.norm_pix)

    def encode(self, images: torch.Tensor, order: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """Tokens in prediction order through prefix-causal (or causal) attention: (B, K, D)."""
        x = self.encoder.embed(images)                                     # (B, K, D)
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        if self.cfg.prefix:
            return self.encoder(x, attention_mask("prefix", x.shape[1], S, x.device))
        return self.encoder(x, is_causal=True)

    def decode(self, z: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Position i predicts the patch at position i+1: (B, K-1, p*p*C). The target's sin-cos
        position is added again before the head, so non-raster orders know where to draw."""
        pos = self.encoder.pos_embed[order[:, 1:]]                         # (B, K-1, D)
        return self.head(z[:, :-1] + pos)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """MSE (or token cross-entropy) on patches after the prefix only. Averaged per image, then over images, so that
        any split of the batch across ranks gives the same loss as one process."""
        K = target.shape[1]
        pos = torch.arange(1, K, device=pred.device)                       # index of the predicted patch
        keep = (pos[None] >= S[:, None]).float()                           # (B, K-1)
        if self.cfg.loss == "token_ce":
            err = F.cross_entropy(pred.float().transpose(1, 2), target[:, 1:, 0], reduction="none")
        else:
            err = (pred.float() - target[:, 1:]).pow(2).mean(dim=-1)       # (B, K-1)
        return ((err * keep).sum(1) / keep.sum(1)).mean()

    def forward(self, batch: dict) -> Output:
        images, noise = batch["image"], batch["noise"]
        order, S = self.sample_order(noise), self.sample_prefix(noise)
        target = self.targets(images)
        target = target.gather(1, order[..., None].expand(-1, -1, target.shape[-1]))
        pred = self.decode(self.encode(images, order, S), order)
        return Output(self.loss(pred, target, S))

    def timm_peer(self, cfg) -> nn.Module:
        return TimmTrunk(self, cfg.model)


class TimmTrunk(nn.Module):
    """`imagelm bench`'s peer: timm's VisionTransformer as the trunk (same width, depth, heads,
    patch, prefix mask) under this AIM's head and loss, so only the backbone implementation differs."""

    def __init__(self, aim: AIM, model: ModelConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.aim = aim
        self.vit = VisionTransformer(img_size=model.img_size, patch_size=model.patch_size, in_chans=model.in_chans,
                                     num_classes=0, embed_dim=model.dim, depth=model.depth, num_heads=model.heads,
                                     mlp_ratio=model.mlp_ratio, qkv_bias=model.bias, class_token=False,
                                     global_pool="", no_embed_class=True)

    def forward(self, batch: dict) -> Output:
        images, noise = batch["image"], batch["noise"]
        order, S = self.aim.sample_order(noise), self.aim.sample_prefix(noise)
        mask = attention_mask("prefix", order.shape[1], S, images.device)
        z = self.vit.forward_features(images, attn_mask=mask)
        return Output(self.aim.loss(self.aim.decode(z, order), self.aim.targets(images), S))
