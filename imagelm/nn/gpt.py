"""A Transformer over discrete tokens (GPT-2 style): token + learned position embeddings, the
shared Transformer, an output head; and sampling with the KV cache. iGPT's pixel model and the
text towers of the image-text methods are this module."""
from __future__ import annotations

import torch
from torch import nn

from imagelm.nn.transformer import Transformer


class TokenTransformer(nn.Module):
    def __init__(self, vocab: int, max_len: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 bias: bool = False, eps: float = 1e-6, causal: bool = True, out: int | None = None):
        super().__init__()
        self.causal, self.max_len = causal, max_len
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.zeros(max_len, dim))
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, bias, eps)
        self.head = nn.Linear(dim, out, bias=False) if out else None   # out = None: features only
        self.apply(_init_weights)
        nn.init.normal_(self.pos_embed, std=0.01)                       # GPT-2

    @property
    def num_layers(self) -> int:
        return len(self.transformer.blocks)

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, T) ids at positions start..start+T-1 -> (B, T, D)."""
        T = tokens.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's {self.max_len} positions")
        return self.tok_embed(tokens) + self.pos_embed[start:start + T]

    def forward(self, x: torch.Tensor, layers: list[int] | None = None, cache=None):
        """Embedded tokens (B, T, D) -> normed hidden states (B, T, D) (or the block outputs in
        `layers`); causal or bidirectional as built."""
        return self.transformer(x, is_causal=self.causal, layers=layers, cache=cache)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, out): position t predicts token t+1 (causal) or token t (bidirectional)."""
        return self.head(self(self.embed(tokens)))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)                             # GPT-2
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def sample_from(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """One token per row from logits (B, V) by inverse CDF at uniforms u (B,): the same u and
    logits always give the same token, so cached and recomputed sampling can be compared."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(model: TokenTransformer, prefix: torch.Tensor, steps: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue causal sequences prefix (B, T0) by `steps` sampled tokens -> (B, T0 + steps).
    With use_cache the prefix is encoded once and each step runs one token through the KV cache;
    without it every step re-encodes the whole sequence (the reference the cache must match)."""
    u = torch.rand(steps, prefix.shape[0], generator=generator).to(prefix.device)
    seq = prefix
    if use_cache:
        cache = model.transformer.new_cache(prefix.shape[0], prefix.shape[1] + steps,
                                            dtype=model.pos_embed.dtype, device=prefix.device)
        h = model(model.embed(prefix), cache=cache)[:, -1]              # (B, D)
    for t in range(steps):
        if not use_cache:
            h = model(model.embed(seq))[:, -1]
        nxt = sample_from(model.head(h), u[t], temperature, top_k)[:, None]
        seq = torch.cat([seq, nxt], dim=1)
        if use_cache and t + 1 < steps:
            h = model(model.embed(nxt, start=seq.shape[1] - 1), cache=cache)[:, -1]
    return seq
