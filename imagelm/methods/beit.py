"""BEiT: masked image modeling on visual tokens (Bao et al. 2021, arXiv 2106.08254).

A visual tokenizer maps each patch to a code; ~40% of the patches are masked block-wise; the
encoder sees the whole sequence with a learned [MASK] embedding at masked positions and predicts
the code of every masked patch with cross-entropy.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagelm.config import POSITIVE, RATIO, ModelConfig, Unit
from imagelm.methods.base import Method, Output, register
from imagelm.nn.vit import ViT
from imagelm.tokenizers.visual import TokenTargets, VisualTokenizer, prepare_tokenizer


@dataclass
class BEiTConfig(TokenTargets):
    mask_ratio: Annotated[float, RATIO] = 0.4
    masking: Literal["block", "random"] = "block"   # random: the ablation
    min_block: Annotated[int, POSITIVE] = 16          # patches, at BEiT's 14 x 14 grid; scaled to other grids by area
    aspect: Unit = 0.3                    # block aspect ratio in [aspect, 1 / aspect]


def block_mask(grid: int, count: int, min_block: int, aspect: float, rng: random.Random) -> torch.Tensor:
    """BEiT's block-wise masking: add random rectangles (area >= min_block patches, aspect ratio in
    [aspect, 1/aspect], each no larger than the remaining budget) until `count` patches are masked.
    Returns a (grid * grid,) 0/1 mask in raster order. Plain Python sets of raster indices: a step
    draws one mask per image, and tensor ops on a 7 x 7 grid cost more than the sets."""
    masked: set[int] = set()
    log_lo, log_hi = math.log(aspect), math.log(1 / aspect)
    for _ in range(100):
        left = count - len(masked)
        if left <= 0:
            break
        for _ in range(10):   # a rectangle that adds at least one new patch within the budget
            area = rng.uniform(min(min_block, left), left)
            r = math.exp(rng.uniform(log_lo, log_hi))
            h, w = round(math.sqrt(area * r)), round(math.sqrt(area / r))
            if not (1 <= h <= grid and 1 <= w <= grid):
                continue
            top, lft = rng.randint(0, grid - h), rng.randint(0, grid - w)
            block = {i * grid + j for i in range(top, top + h) for j in range(lft, lft + w)}
            new = len(block - masked)
            if 0 < new <= left:
                masked |= block
                break
    left = count - len(masked)
    if left > 0:             # top up single patches so every image meets the ratio exactly
        free = [i for i in range(grid * grid) if i not in masked]
        masked.update(rng.sample(free, left))
    mask = torch.zeros(grid * grid)
    mask[list(masked)] = 1
    return mask


@torch.compiler.disable    # Python loops with a seeded RNG, as BEiT's data-loader masking: run eagerly
def block_masks(u: torch.Tensor, grid: int, count: int, min_block: int, aspect: float) -> torch.Tensor:
    """One block mask per uniform number in u (B,), each seeded by it -> (B, grid * grid) 0/1."""
    seeds = (u.double() * 2 ** 31).long().tolist()
    return torch.stack([block_mask(grid, count, min_block, aspect, random.Random(s)) for s in seeds]).to(u.device)


@register("beit")
class BEiT(Method):
    Config = BEiTConfig

    def __init__(self, model: ModelConfig, cfg: BEiTConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT(model)
        K = self.encoder.num_patches
        self.noise_dim = K     # one seed for block sampling, or per-patch noise for random masking
        self.count = round(cfg.mask_ratio * K)
        self.min_block = max(1, round(cfg.min_block * K / 196))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, model.dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(model.dim, cfg.vocab)
        self.tokenizer = VisualTokenizer(cfg.tokenizer_config(model))
        self.tokenizer.requires_grad_(False)

    def prepare(self, data, run_dir, log=print) -> None:
        prepare_tokenizer(self.tokenizer, self.cfg, data, run_dir, log)

    # --- the method, step by step -------------------------------------------------------------
    def mask(self, noise: torch.Tensor) -> torch.Tensor:
        """(B, K) 0/1, exactly `count` masked per image."""
        if self.cfg.masking == "random":
            ranks = noise.argsort(1).argsort(1)
            return (ranks < self.count).float()
        return block_masks(noise[:, 0], self.encoder.grid, self.count, self.min_block, self.cfg.aspect)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(images)                                  # (B, K) codes

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder.embed(images)                                        # (B, K, D)
        tok = (self.mask_token + self.encoder.pos_embed).to(x.dtype)
        return self.encoder(torch.where(mask[..., None].bool(), tok, x))      # (B, K, D)

    def loss(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on masked positions only (logits already selected there)."""
        return F.cross_entropy(logits.float(), codes)

    def forward(self, batch: dict) -> Output:
        images = batch["image"]
        mask = self.mask(batch["noise"])
        z = self.encode(images, mask)
        where = mask.bool()
        codes = self.targets(images)[where]
        logits = self.head(z[where])                                          # (B * count, vocab)
        acc = (logits.argmax(-1) == codes).float().mean()
        return Output(self.loss(logits, codes), {"token_acc": acc})
