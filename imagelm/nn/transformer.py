"""The one Transformer every method uses: pre-norm blocks, SDPA attention, full/causal/prefix
masks, a KV cache for autoregressive sampling, and Multiway blocks (BEiT-3): shared attention,
one FFN expert per modality."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MaskMode = Literal["full", "causal", "prefix"]

# Short sequences on CPU: attention is written out (timm's non-fused path) rather than asked of
# SDPA: SDPA's math backend upcasts bf16 q/k/v to fp32, and its flash kernel loses at these
# lengths. Written out it runs in the autocast dtype (bf16 scores, as any non-fused attention under
# autocast has): training forward + backward 1.3-2.4x faster than the math backend at 12-160 tokens
# (benchmarks/attention_backends.py), the training step of mae-, aim- and igpt-tiny ~1.1-1.2x;
# inference 2x faster than flash at 49 tokens (the eval feature pass of aim-tiny ~1.1x).
# Longer sequences keep SDPA (flash), which never materialises the N x N scores; written out is
# still faster at 196 tokens here, about even with flash at 256, 2-3x slower at 784.
CPU_EXPLICIT_ATTENTION_MAX_LEN = 160


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                       is_causal: bool = False) -> torch.Tensor:
    """SDPA's result, softmax(q k^T / sqrt(d) masked) v, with the scores materialised: q (B, h, N, d),
    k and v (B, h, M, d), mask broadcastable to (B, h, N, M) with True = may attend."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)                  # (B, h, N, M)
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _explicit(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.shape[1] <= CPU_EXPLICIT_ATTENTION_MAX_LEN


def attention_mask(mode: MaskMode, n: int, prefix_len: torch.Tensor | None = None,
                   device=None) -> torch.Tensor | None:
    """Boolean mask (True = may attend) for SDPA, or None when no mask is needed.

    full:   every token sees every token.
    causal: token i sees tokens j <= i.
    prefix: per sample b, tokens i < S_b see the whole prefix j < S_b (bidirectional);
            the rest is causal. Shape (B, 1, n, n), broadcast over heads.
    """
    if mode == "full":
        return None
    i = torch.arange(n, device=device)
    causal = i[None, :] <= i[:, None]                                   # (n, n) [query, key]
    if mode == "causal":
        return causal
    if mode != "prefix":
        raise ValueError(f"unknown attention mask mode {mode!r}; choose full, causal or prefix")
    if prefix_len is None:
        raise ValueError("prefix attention needs prefix_len (one length per sample)")
    S = prefix_len.to(device).view(-1, 1, 1)                            # (B, 1, 1)
    in_prefix = (i[:, None] < S) & (i[None, :] < S)                     # (B, n, n)
    return (causal[None] | in_prefix)[:, None]                          # (B, 1, n, n)


class KVCache:
    """Keys and values of the tokens seen so far, per block, preallocated to `max_len`: a decode
    step then costs one token's projections plus attention over the cache, not a full re-encode."""

    def __init__(self, depth: int, batch: int, heads: int, head_dim: int, max_len: int, dtype=torch.float32,
                 device=None):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.len, self.max_len = 0, max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' k, v (B, h, T, d) to block `layer`; all keys/values so far."""
        T = k.shape[2]
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.len} + {T} do not fit")
        self.k[layer][:, :, self.len:self.len + T] = k
        self.v[layer][:, :, self.len:self.len + T] = v
        return self.k[layer][:, :, :self.len + T], self.v[layer][:, :, :self.len + T]

    def mask(self, T: int, device=None) -> torch.Tensor | None:
        """New token i (at absolute position len+i) sees cached tokens and new tokens j <= i."""
        if T == 1:
            return None
        i = torch.arange(T, device=device)[:, None]
        return torch.arange(self.len + T, device=device)[None, :] <= self.len + i     # (T, len+T)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} is not divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3x(B, h, N, d)
        if cache is not None:    # causal decoding: attend to the cache, then these tokens causally
            mask, is_causal = cache.mask(N, x.device), False
            k, v = cache.update(layer, k, v)                               # (B, h, len+N, d)
        is_causal = is_causal and mask is None
        if cache is None and _explicit(x):
            x = explicit_attention(q, k, v, mask, is_causal)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# Multiway routing: the FFN expert each token goes through
VISION, LANGUAGE, VISION_LANGUAGE = 0, 1, 2


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    With experts > 1 it is a Multiway block: attention stays shared, and each token goes through
    the (norm, FFN) of its route: `norm2`/`mlp` are the vision expert (so a one-expert block is
    the plain block), `experts[0]` the language expert, `experts[1]` the vision-language one."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, bias: bool = False, eps: float = 1e-6,
                 experts: int = 1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=bias)
        self.attn = Attention(dim, heads, bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=bias)
        self.mlp = MLP(dim, int(dim * mlp_ratio), bias)
        self.experts = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim, eps=eps, bias=bias),
                                                   MLP(dim, int(dim * mlp_ratio), bias)) for _ in range(experts - 1))
        self.checkpointing = False     # recompute this block's activations in backward (train.activation_checkpointing)

    def ffn(self, x: torch.Tensor, route: list[int] | None) -> torch.Tensor:
        """route: one expert id per position (shared by the batch), or None = all vision."""
        kinds = {VISION} if route is None else set(route)
        if max(kinds) > len(self.experts):
            raise ValueError(f"route asks for expert {max(kinds)}; this block has {len(self.experts) + 1}")
        if len(kinds) == 1:      # one modality: no gather/scatter
            e = kinds.pop()
            return self.mlp(self.norm2(x)) if e == VISION else self.experts[e - 1](x)
        out = None
        for e in sorted(kinds):
            idx = torch.tensor([i for i, r in enumerate(route) if r == e], device=x.device)
            h = x.index_select(1, idx)                                        # (B, n_e, D)
            y = self.mlp(self.norm2(h)) if e == VISION else self.experts[e - 1](h)
            out = (x.new_zeros(x.shape, dtype=y.dtype) if out is None else out).index_copy(1, idx, y)
        return out

    def forward(self, x, mask=None, is_causal=False, cache: KVCache | None = None, layer: int = 0,
                route: list[int] | None = None):
        if self.checkpointing and cache is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, mask, is_causal, None, layer, route, use_reentrant=False)
        return self._forward(x, mask, is_causal, cache, layer, route)

    def _forward(self, x, mask, is_causal, cache, layer, route):
        x = x + self.attn(self.norm1(x), mask, is_causal, cache, layer)
        return x + self.ffn(x, route)


class Transformer(nn.Module):
    """multiway: every block gets a language FFN beside the vision one, and the top `vl_layers`
    blocks also a vision-language FFN (BEiT-3)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, bias: bool = False,
                 eps: float = 1e-6, multiway: bool = False, vl_layers: int = 0):
        super().__init__()
        if vl_layers and not multiway or not 0 <= vl_layers <= depth:
            raise ValueError(f"vl_layers={vl_layers} needs a multiway Transformer with at least that many blocks")
        experts = [1 + multiway + (i >= depth - vl_layers) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, bias, eps, e) for e in experts)
        self.norm = nn.LayerNorm(dim, eps=eps, bias=bias)

    def new_cache(self, batch: int, max_len: int, dtype=torch.float32, device=None) -> KVCache:
        attn = self.blocks[0].attn
        return KVCache(len(self.blocks), batch, attn.heads, attn.qkv.in_features // attn.heads, max_len, dtype,
                       device)

    def routes(self, modality: torch.Tensor | list[int] | None, fuse: bool) -> list[list[int] | None]:
        """Each block's expert per position: its modality (VISION/LANGUAGE), except in blocks with
        a vision-language expert when the input is a fused image-text pair."""
        if modality is None:
            return [None] * len(self.blocks)
        modality = modality.tolist() if isinstance(modality, torch.Tensor) else list(modality)
        vl = [VISION_LANGUAGE] * len(modality)
        return [vl if fuse and len(b.experts) == 2 else modality for b in self.blocks]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                layers: list[int] | None = None, cache: KVCache | None = None,
                modality: torch.Tensor | list[int] | None = None, fuse: bool = False):
        """x (B, N, D) -> normed output (B, N, D); with `layers`, the list of those block outputs
        instead (0 = the input tokens, i = after block i), computed only as deep as needed.
        With `cache`, x are the next N tokens of causal sequences whose earlier tokens the cache
        holds; their keys and values are appended to it. Multiway: `modality` (N,) says which
        positions are image (VISION) or text (LANGUAGE) tokens, the same for the whole batch;
        `fuse` marks the input as image-text pairs (the vision-language experts serve them)."""
        routes = self.routes(modality, fuse)
        if layers is None:
            for i, blk in enumerate(self.blocks):
                x = blk(x, mask, is_causal, cache, i, routes[i])
            if cache is not None:
                cache.len += x.shape[1]
            return self.norm(x)
        if cache is not None:
            raise ValueError("a KV cache is for decoding; ask for block outputs without one")
        outs, want = {}, set(layers)
        if 0 in want:
            outs[0] = x
        for i, blk in enumerate(self.blocks[: max(layers)], start=1):
            x = blk(x, mask, is_causal, route=routes[i - 1])
            if i in want:
                outs[i] = x
        return [outs[i] for i in layers]
