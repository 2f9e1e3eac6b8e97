"""Heads on top of the backbone: AIM's per-patch MLP head and attention pooling."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
