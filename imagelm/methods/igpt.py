"""iGPT: generative pretraining from pixels (Chen et al., ICML 2020).

Each pixel becomes one token of a k-means colour palette; a GPT-2 style Transformer with a
start-of-sequence token and learned positions either predicts the next pixel in raster order
(autoregressive) or, as BERT, sees 15% of the tokens with their embeddings zeroed and predicts
them. Features for probes are the layer-normed tokens of one layer, average-pooled; the best
layer is usually in the middle of the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagelm.config import NON_NEGATIVE, POSITIVE, RATIO, Check, ConfigError, ModelConfig
from imagelm.methods.base import Method, Output, register
from imagelm.nn.gpt import TokenTransformer, generate
from imagelm.tokenizers.palette import Palette


@dataclass
class IGPTConfig:
    objective: Literal["ar", "bert"] = "ar"
    palette: Annotated[int, Check(lambda v: v >= 2, "be >= 2")] = 512
                                 # colours (9 bits); grey images need far fewer
    resolution: Annotated[int, NON_NEGATIVE] = 32
                                 # pixels per side the model sees (input is area-downsampled); 0 = model.img_size
    mask_ratio: Annotated[float, RATIO] = 0.15     # BERT
    palette_pixels: Annotated[int, POSITIVE] = 100_000   # pixels sampled for the palette's k-means


class PixelGPT(nn.Module):
    """The iGPT encoder: palette + token Transformer, with the ViT's downstream API
    (`features(images, layers)`, `num_layers`) so every probe reads it the same way."""

    def __init__(self, model: ModelConfig, cfg: IGPTConfig):
        super().__init__()
        r = cfg.resolution or model.img_size
        self.palette = Palette(cfg.palette, model.in_chans, r)
        self.seq_len = r * r
        self.sos = cfg.palette                       # the extra token id: start of sequence
        self.gpt = TokenTransformer(cfg.palette + 1, self.seq_len + 1, model.dim, model.depth, model.heads,
                                    model.mlp_ratio, model.bias, model.norm_eps, causal=cfg.objective == "ar",
                                    out=cfg.palette)

    @property
    def num_layers(self) -> int:
        return self.gpt.num_layers

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + r*r): SOS, then the pixels' palette ids in raster order."""
        t = self.palette.quantize(images)
        return torch.cat([torch.full_like(t[:, :1], self.sos), t], dim=1)

    def features(self, images: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """Per-layer token features as iGPT defines them, n^l = layer_norm(h^l): the residual
        stream after block l, normed by the LayerNorm that reads it next (block l+1's attention
        norm; the final norm after the last block). Pre-norm residual streams differ in scale from
        token to token; normed, every token weighs alike in the probe's average pool.
        In the attention pattern the model was trained with: AR sees what it was trained on, SOS
        x_1..x_{N-1} (B, N, D), as openai/image-gpt pools; BERT sees SOS x_1..x_N (B, 1 + N, D),
        nothing masked. Pooling is the probe's job."""
        layers = layers or [self.num_layers]
        tokens = self.tokens(images)
        if self.gpt.causal:
            tokens = tokens[:, :-1]
        t = self.gpt.transformer
        norms = [b.norm1 for b in t.blocks] + [t.norm]                  # n^l reads h^l through norms[l]
        return [norms[l](h) for l, h in zip(layers, self.gpt(self.gpt.embed(tokens), layers=layers))]


@register("igpt")
class IGPT(Method):
    Config = IGPTConfig

    def __init__(self, model: ModelConfig, cfg: IGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PixelGPT(model, cfg)
        N = self.encoder.seq_len
        self.noise_dim = N if cfg.objective == "bert" else 0
        self.count = max(1, round(cfg.mask_ratio * N))

    def prepare(self, data, run_dir, log=print) -> None:
        from imagelm.data.transforms import normalize

        pal = self.encoder.palette
        pal.fit(normalize(data.images[:20000], data.mean, data.std), self.cfg.palette_pixels)
        x = normalize(data.images[-2000:], data.mean, data.std)
        toks = pal.quantize(x)
        err = (pal.colours[toks] - pal.pixels(x)).pow(2).mean()
        log(f"palette: {pal.size} colours at {pal.resolution}x{pal.resolution}, usage {pal.usage(toks):.0%}, "
            f"quantisation mse {err:.4f} (standardised units)")

    # --- the method, step by step -------------------------------------------------------------
    def mask(self, noise: torch.Tensor) -> torch.Tensor:
        """BERT: (B, N) bool, exactly `count` pixels per image (the lowest-noise ones)."""
        return noise.argsort(1).argsort(1) < self.count

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, 1+N) -> (B, 1+N, D); BERT zeroes the token embedding (not the position) where masked."""
        gpt = self.encoder.gpt
        tok = gpt.tok_embed(tokens)
        if mask is not None:
            tok = tok.masked_fill(F.pad(mask, (1, 0))[..., None], 0.0)
        return tok + gpt.pos_embed[:tokens.shape[1]]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy in nats per predicted pixel (the paper reports bits/dim = this / ln 2)."""
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def forward(self, batch: dict) -> Output:
        tokens = self.encoder.tokens(batch["image"])                            # (B, 1+N)
        gpt = self.encoder.gpt
        if self.cfg.objective == "ar":                  # SOS, x_1..x_{N-1} predict x_1..x_N
            logits = gpt.head(gpt(self.embed(tokens[:, :-1], None)))             # (B, N, V)
            loss = self.loss(logits, tokens[:, 1:])
        else:                                           # only masked pixels are predicted
            mask = self.mask(batch["noise"])                                     # (B, N)
            h = gpt(self.embed(tokens, mask))[:, 1:]                             # (B, N, D)
            loss = self.loss(gpt.head(h[mask]), tokens[:, 1:][mask])
        return Output(loss, {"bits_per_dim": loss.detach() / torch.log(torch.tensor(2.0))})

    def benchmarks(self, cfg, device, profile_step) -> dict:
        """`imagelm bench`: sampling 784-token images with the KV cache vs re-encoding the prefix at
        every step (same seed), and a training step's time and peak memory at 196 vs 784 tokens
        (`profile_step(cfg, batch, device)`, bench's profiler, times a config's step)."""
        import dataclasses
        import time

        torch.manual_seed(0)
        big = IGPT(cfg.model, dataclasses.replace(self.cfg, resolution=28, objective="ar")).to(device).eval()
        big.encoder.palette.colours.copy_(torch.linspace(-1.0, 2.0, self.cfg.palette)[:, None].to(device))
        x = torch.randn(2, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, device=device)
        out, sec = {}, {}
        big.complete(x, 27, generator=torch.Generator().manual_seed(0))      # warm-up: one row
        for cached in (True, False):     # fp32 so that both paths see the same logits
            t0 = time.perf_counter()
            out[cached] = big.complete(x, 14, generator=torch.Generator().manual_seed(0), use_cache=cached)
            sec[cached] = time.perf_counter() - t0
        res = {"kv_cache_speedup": sec[False] / sec[True], "kv_cache_identical": bool(torch.equal(*out.values())),
               "sample_s_cached": sec[True], "sample_s_recompute": sec[False]}
        for r in (14, 28):
            prof = profile_step(dataclasses.replace(cfg, objective=dataclasses.replace(self.cfg, resolution=r)),
                                8, device)
            res[f"step_s_{r * r}"], res[f"peak_mem_mb_{r * r}"] = prof["step_s"], prof["peak_mem_mb"]
        res["seq_4x_time_growth"] = res["step_s_784"] / res["step_s_196"]
        res["seq_4x_memory_growth"] = res["peak_mem_mb_784"] / res["peak_mem_mb_196"]
        res["notes"] = [
            f"sampling 2 images x 392 pixels at 784 tokens: KV cache {sec[True]:.1f}s vs recompute {sec[False]:.1f}s "
            f"(identical tokens: {res['kv_cache_identical']})",
            f"training step, batch 8: 196 tokens {res['step_s_196'] * 1000:.0f} ms / {res['peak_mem_mb_196']:.0f} MB, "
            f"784 tokens {res['step_s_784'] * 1000:.0f} ms / {res['peak_mem_mb_784']:.0f} MB: 4x the tokens cost "
            f"{res['seq_4x_time_growth']:.1f}x time, {res['seq_4x_memory_growth']:.1f}x memory (materialised "
            f"N x N scores would grow those up to 16x)"]
        return res

    @torch.no_grad()
    def complete(self, images: torch.Tensor, keep_rows: int, temperature: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Condition on the top `keep_rows` rows of pixels and sample the rest: (B, C, r, r)."""
        if self.cfg.objective != "ar":
            raise ConfigError(f"--complete needs an autoregressive run; this one was trained with "
                              f"igpt.objective={self.cfg.objective}")
        r = self.encoder.palette.resolution
        prefix = self.encoder.tokens(images)[:, :1 + keep_rows * r]
        seq = generate(self.encoder.gpt, prefix, r * r - keep_rows * r, temperature, top_k, generator, use_cache)
        return self.encoder.palette.dequantize(seq[:, 1:])
