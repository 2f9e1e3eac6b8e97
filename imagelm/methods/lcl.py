"""LCL: latent compression learning on interleaved image-text documents (Yang et al. 2024,
arXiv 2406.07543).

Every image of a document is encoded by the shared ViT; its patch tokens, projected, take the
image's place in the text between <boi> and <eoi>, and a causal Transformer reads the document.
Two losses train the vision encoder: the causal model's output at the <boi> that opens image k
must predict that image's attention-pooled latent z_k (InfoNCE against every image of the global
batch: the context compresses into the latent), and next-token cross-entropy on the text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from imagelm import dist
from imagelm.config import FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, ModelConfig, Rule
from imagelm.methods.base import Method, Output, register
from imagelm.methods.clip import logit_scale
from imagelm.nn.contrastive import info_nce
from imagelm.nn.gpt import TokenTransformer
from imagelm.nn.heads import AttentionPool
from imagelm.nn.vit import ViT
from imagelm.tokenizers.text import load_or_train


@dataclass
class LCLConfig:
    objective: Literal["both", "contrastive", "generation"] = "both"   # the paper's ablation
    text_weight: Annotated[float, NON_NEGATIVE] = 1.0
    contrastive_weight: Annotated[float, NON_NEGATIVE] = 0.1
    embed_dim: Annotated[int, POSITIVE] = 256         # the latent z and the <boi> prediction
    pool: Literal["attention", "mean"] = "attention"   # how z_k summarises the patch tokens (paper: attention)
    image_tokens: Annotated[int, NON_NEGATIVE] = 0
                                 # visual tokens per image in the sequence (0 = every patch; else g*g pooled)
    context_length: Annotated[int, POSITIVE] = 2048   # document tokens, images included
    text_vocab: Annotated[int, POSITIVE] = 32000
    text_dim: Annotated[int, POSITIVE] = 512
    text_depth: Annotated[int, POSITIVE] = 12
    text_heads: Annotated[int, POSITIVE] = 8
    init_temperature: Annotated[float, POSITIVE] = 0.07
    caption_image_first: Annotated[float, FRACTION] = 0.5
                                 # captions as one-image documents: P(image before its caption), per step
    tokenizer: str = ""          # a saved text tokenizer; "" = RUN/text_tokenizer, trained on first use
    RULES: ClassVar[tuple[Rule, ...]] = (
        (lambda c: c.text_dim % c.text_heads == 0, "{w}text_dim must be a multiple of {w}text_heads"),)


@register("lcl")
class LCL(Method):
    Config = LCLConfig
    export_leaves_out = "LCL's text model, projections and heads (the image tower is exported)"

    @property
    def couples_samples(self) -> bool:     # its InfoNCE pairs every image of the global batch
        return self.cfg.objective != "generation"

    def __init__(self, model: ModelConfig, cfg: LCLConfig):
        super().__init__()
        self.cfg = cfg
        self.noise_dim = 0
        self.encoder = ViT(model)
        K = self.encoder.num_patches
        self.M = cfg.image_tokens or K
        if math.isqrt(self.M) ** 2 != self.M:
            raise ConfigError(f"lcl.image_tokens={cfg.image_tokens} must be a square (g x g pooled patches)")
        self.pool = AttentionPool(model.dim, math.gcd(8, model.dim)) if cfg.pool == "attention" else None
        self.z_proj = nn.Linear(model.dim, cfg.embed_dim, bias=False)
        self.vis_proj = nn.Linear(model.dim, cfg.text_dim)
        self.lm = TokenTransformer(cfg.text_vocab, cfg.context_length, cfg.text_dim, cfg.text_depth, cfg.text_heads,
                                   model.mlp_ratio, model.bias, model.norm_eps, causal=True, out=cfg.text_vocab)
        self.ctx_proj = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)
        self.logit_scale = logit_scale(cfg.init_temperature, self)
        self.tokenizer, self.slots = None, 1

    # --- data: documents -> token sequences with image slots ------------------------------------
    def prepare(self, data, run_dir, log=print) -> None:
        """Train (or load) the BPE tokenizer on the documents' text or the captions (a bounded
        sample of a streamed set); the loader lays out each sample as it reads it."""
        if data.documents is not None:
            texts = [p for d in data.documents for p in d if isinstance(p, str)]
        elif data.texts is not None:
            texts = data.texts
        else:
            raise ConfigError("lcl trains on interleaved documents or captioned images: set data.dataset to "
                              "interleaved, image-text (your shards with KEY.txt captions), captions, scenes or "
                              "captions+scenes")
        self.tokenizer = load_or_train(self.cfg.tokenizer, self.cfg.text_vocab, texts, run_dir, log)
        self.slots = data.images_per_sample
        log(f"lcl: each sample laid out as read: sequences of {self.cfg.context_length} tokens, {self.slots} image "
            f"slot(s) of {self.M} tokens")

    def text_transform(self) -> "DocumentLayout":
        """Each sample (a document's parts, or a caption: a one-image document) -> tokens, slot,
        boi, valid, in the loader's workers."""
        if self.tokenizer is None:
            raise RuntimeError("LCL has no text tokenizer: call prepare()")
        return DocumentLayout(self.tokenizer, self.cfg.context_length, self.M, self.slots,
                              self.cfg.caption_image_first)

    def layout(self, docs: list[list], J: int) -> dict[str, torch.Tensor]:
        """Documents (lists of text segments and image slots) laid out as a batch: see DocumentLayout."""
        lay = DocumentLayout(self.tokenizer, self.cfg.context_length, self.M, J)
        out = [lay(d, None) for d in docs]
        return {k: torch.stack([o[k] for o in out]) for k in out[0]}

    # --- the method, step by step -------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C, H, W) -> latents z (n, E), unit norm, and visual tokens for the sequence (n, M, Dt)."""
        h = self.encoder(self.encoder.embed(images))                                   # (n, K, D)
        z = F.normalize(self.z_proj(self.pool(h) if self.pool is not None else h.mean(1)), dim=-1)
        if self.M != h.shape[1]:
            g, G = math.isqrt(self.M), self.encoder.grid
            grid = h.transpose(1, 2).reshape(len(h), -1, G, G)
            h = F.adaptive_avg_pool2d(grid, g).flatten(2).transpose(1, 2)              # (n, M, D)
        return z, self.vis_proj(h)

    def read(self, tokens: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        """The causal model over a document with each image's visual tokens in its slots: (B, L, Dt)."""
        B, L = tokens.shape
        Dt = vis.shape[-1]
        J = valid.shape[1]
        placed = vis.new_zeros(B, J, self.M, Dt)
        placed[valid] = vis                                                            # (B, J, M, Dt)
        at_slot = placed.view(B, J * self.M, Dt).gather(1, slot.clamp(min=0)[..., None].expand(-1, -1, Dt))
        x = torch.where((slot >= 0)[..., None], at_slot, self.lm.tok_embed(tokens).to(vis.dtype))
        return self.lm(x + self.lm.pos_embed[:L])

    def text_loss(self, h: torch.Tensor, tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy on text tokens (and <|endoftext|>), averaged per document, then
        over documents, so that any split of the batch across ranks gives the same loss."""
        tok = self.tokenizer
        target = tokens[:, 1:]
        keep = (slot[:, 1:] < 0) & (target != tok.pad_id) & (target != tok.boi_id) & (target != tok.eoi_id)
        err = F.cross_entropy(self.lm.head(h[:, :-1]).float().transpose(1, 2), target, reduction="none")
        keep = keep.float()
        return ((err * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()

    def contrastive_loss(self, h: torch.Tensor, z: torch.Tensor, boi: torch.Tensor, valid: torch.Tensor):
        """InfoNCE between the output at image k's <boi> and z_k, against every image of the global
        batch; images with nothing before them have no context and ask nothing."""
        B = len(h)
        pos = boi[valid]                                                               # (n,)
        ctx = F.normalize(self.ctx_proj(h[torch.arange(B, device=h.device)[:, None].expand_as(boi)[valid], pos]),
                          dim=-1)
        ask = pos > 0
        keys, offset = dist.gather_varying(z)                                          # (n_all, E)
        queries, _ = dist.gather_varying(ctx[ask])
        target, _ = dist.gather_varying((ask.nonzero().flatten() + offset).float()[:, None])
        target = target.flatten().long()
        if len(queries) == 0:      # nothing to predict in the whole batch; keep every parameter in the graph
            return (z.sum() + ctx.sum() + self.logit_scale.sum()) * 0.0, torch.tensor(0.0)
        loss, logits = info_nce(queries, keys, target, self.logit_scale)                # logits (q, n_all)
        return loss, (logits.argmax(1) == target).float().mean()

    def forward(self, batch: dict) -> Output:
        images, valid = batch["image"], batch["valid"]
        if images.dim() == 4:                      # one-image documents (captions)
            images = images[:, None]
        z, vis = self.encode(images[valid])
        h = self.read(batch["tokens"], batch["slot"], valid, vis)
        loss, metrics = 0.0, {}
        if self.cfg.objective in ("both", "generation"):
            lt = self.text_loss(h, batch["tokens"], batch["slot"])
            loss, metrics["text_loss"] = loss + self.cfg.text_weight * lt, lt.detach()
        if self.cfg.objective in ("both", "contrastive"):
            lc, acc = self.contrastive_loss(h, z, batch["boi"], valid)
            w = self.cfg.contrastive_weight if self.cfg.objective == "both" else 1.0
            loss, metrics["contrastive_loss"], metrics["contrastive_acc"] = loss + w * lc, lc.detach(), acc
        # the ablations leave a head unused; DDP expects a gradient for every parameter, so it gets a zero one
        unused = {"generation": [m for m in (self.pool, self.z_proj, self.ctx_proj) if m is not None],
                  "contrastive": [self.lm.head]}
        for m in unused.get(self.cfg.objective, []):
            loss = loss + 0.0 * sum(p.sum() for p in m.parameters())
        if self.cfg.objective == "generation":
            loss = loss + 0.0 * self.logit_scale.sum()
        return Output(loss, metrics)

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> z (B, E): for the collapse indicator."""
        return self.encode(images)[0]


class DocumentLayout:
    """The loader's per-sample text transform. A document, its text segments (str) and image slots
    (int) in reading order, or a caption (a one-image document: [image, caption] when u[0] <
    image_first, else [caption, image]) -> tokens (L,); slot (L,): -1 for text, else j*M + m for
    visual token m of image j; boi (J,): position of image j's <boi> (-1: absent or cut); valid (J,)."""

    def __init__(self, tokenizer, context_length: int, tokens_per_image: int, slots: int, image_first: float = 0.5):
        self.tok, self.L, self.M, self.J, self.image_first = tokenizer, context_length, tokens_per_image, slots, \
            image_first

    def __call__(self, doc: str | list, u) -> dict[str, torch.Tensor]:
        if isinstance(doc, str):
            doc = [0, doc] if float(u[0]) < self.image_first else [doc, 0]
        tok, L, M = self.tok, self.L, self.M
        boi = torch.full((self.J,), -1, dtype=torch.long)
        ids, slots = [], []
        for part in doc:
            if isinstance(part, str):
                new = tok.encode_ids((" " if ids else "") + part)[:max(0, L - 1 - len(ids))]
                ids += new
                slots += [-1] * len(new)
            elif part < self.J and len(ids) + M + 3 <= L:   # <boi> M slots <eoi>, room left for <|endoftext|>
                boi[part] = len(ids)
                ids += [tok.boi_id] + [tok.pad_id] * M + [tok.eoi_id]
                slots += [-1] + [part * M + m for m in range(M)] + [-1]
        ids, slots = ids[:L - 1] + [tok.eot_id], slots[:L - 1] + [-1]
        tokens = torch.full((L,), tok.pad_id, dtype=torch.long)
        slot = torch.full((L,), -1, dtype=torch.long)
        tokens[:len(ids)], slot[:len(slots)] = torch.tensor(ids), torch.tensor(slots)
        return {"tokens": tokens, "slot": slot, "boi": boi, "valid": boi >= 0}
