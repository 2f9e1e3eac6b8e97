"""Heads on top of the backbone: AIM's per-patch MLP head and attention pooling."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagelm.nn.embed import sincos_2d
from imagelm.nn.transformer import Transformer


class ResidualMLPHead(nn.Module):
    """AIM's head: `depth` residual pre-norm MLP blocks applied to every token independently,
    then a linear map to the target (paper: 12 blocks of width 2048). depth=0 is 'linear head'."""

    def __init__(self, dim: int, out_dim: int, depth: int = 12, width: int = 2048, bias: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim, eps=eps, bias=bias), nn.Linear(dim, width, bias=bias), nn.GELU(),
                          nn.Linear(width, dim, bias=bias))
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps, bias=bias)
        self.out = nn.Linear(dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = x + blk(x)
        return self.out(self.norm(x))


class MaskedDecoder(nn.Module):
    """MAE's decoder: project the encoded visible tokens, append one shared mask token per hidden
    patch, unshuffle to patch order, add sin-cos positions, a small Transformer, then pixels."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", sincos_2d(dim, grid, grid), persistent=False)
        self.transformer = Transformer(dim, depth, heads, bias=True, eps=eps)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, z: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(z)                                                   # (B, keep, Dd)
        B, keep, D = x.shape
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, ids_restore.shape[1] - keep, D)], dim=1)
        x = x.gather(1, ids_restore[..., None].expand(-1, -1, D)) + self.pos_embed   # (B, K, Dd), patch order
        return self.pred(self.transformer(x))


class AttentionPool(nn.Module):
    """One learned query attends over the tokens (K/V projections, multi-head): (B, N, D) -> (B, D).
    AIM's attentive probe and LCL's image latent both pool this way."""

    def __init__(self, dim: int, heads: int = 8, bias: bool = True):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} is not divisible by heads {heads}"
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv = nn.Linear(dim, 2 * dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        k, v = self.kv(x).view(B, N, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 2x(B, h, N, d)
        q = self.query.expand(B, -1, -1).view(B, 1, self.heads, D // self.heads).transpose(1, 2)  # (B, h, 1, d)
        return F.scaled_dot_product_attention(q, k, v).reshape(B, D)
