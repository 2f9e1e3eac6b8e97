"""BEiT-3: a Multiway Transformer pretrained by masked data modeling on images, texts and
image-text pairs (Wang et al. 2022, arXiv 2208.10442).

One backbone, the shared ViT with Multiway blocks, reads image patches, text tokens, or both:
attention is shared, and every token goes through its modality's FFN (in the top blocks, pairs go
through the vision-language FFN). One objective: mask part of the input and predict what was
there with cross-entropy: the visual tokenizer's code of each masked patch (40%, block-wise, as
BEiT), and each masked word (15% of texts alone, 50% of the captions of pairs). Each sample of a
batch serves as an image, a text or a pair, in the configured proportions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from imagelm import dist
from imagelm.config import NON_NEGATIVE, POSITIVE, RATIO, Check, ConfigError, ModelConfig, Unit
from imagelm.methods.base import Method, Output, register
from imagelm.methods.beit import block_masks
from imagelm.nn.transformer import LANGUAGE, VISION
from imagelm.nn.vit import ViT
from imagelm.tokenizers.text import EOT, MASK, PAD, SPECIAL_TOKENS, load_or_train
from imagelm.tokenizers.visual import TokenTargets, VisualTokenizer, prepare_tokenizer

IMAGE, TEXT, PAIR = 0, 1, 2          # what a sample is used as
EOT_ID, PAD_ID, MASK_ID = (SPECIAL_TOKENS.index(t) for t in (EOT, PAD, MASK))


MIX = Check(lambda v: len(v) == 3 and sum(v) > 0, "be three shares [image, text, pair], not all 0")


@dataclass
class BEiT3Config(TokenTargets):
    vl_layers: Annotated[int, NON_NEGATIVE] = 3                 # top blocks with a vision-language expert
    image_mask_ratio: Annotated[float, RATIO] = 0.4      # block-wise
    min_block: Annotated[int, POSITIVE] = 16                # patches, at a 14 x 14 grid; scaled to other grids by area
    aspect: Unit = 0.3
    text_mask_ratio: Annotated[float, RATIO] = 0.15      # texts alone
    pair_text_mask_ratio: Annotated[float, RATIO] = 0.5  # the captions of image-text pairs
    mix: Annotated[tuple[Annotated[float, NON_NEGATIVE], ...], MIX] = (1.0, 1.0, 1.0)
                                       # image : text : pair, the share of samples used as each
    text_documents: bool = True        # the text stream also reads the interleaved documents' text (built corpora)
    context_length: Annotated[int, POSITIVE] = 64
    text_vocab: Annotated[int, POSITIVE] = 64010            # BEiT-3's SentencePiece vocabulary
    text_tokenizer: str = ""           # a saved text tokenizer; "" = RUN/text_tokenizer, trained on first use


@register("beit3")
class BEiT3(Method):
    Config = BEiT3Config
    export_leaves_out = ("the Multiway language and vision-language experts, text embeddings and tokenizer (BEiT-3's "
                         "vision path is exported: attention plus the vision FFN expert of every block)")

    def __init__(self, model: ModelConfig, cfg: BEiT3Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT(model, multiway=True, vl_layers=cfg.vl_layers)
        K, L = self.encoder.num_patches, cfg.context_length
        self.noise_dim = 2 + L       # the sample's use, its block-mask seed, one number per text token
        self.count = round(cfg.image_mask_ratio * K)
        self.min_block = max(1, round(cfg.min_block * K / 196))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, model.dim))
        self.text_embed = nn.Embedding(cfg.text_vocab, model.dim)
        self.text_pos = nn.Parameter(torch.zeros(L, model.dim))
        for p in (self.mask_token, self.text_pos, self.text_embed.weight):
            nn.init.trunc_normal_(p, std=0.02)
        self.image_head = nn.Linear(model.dim, cfg.vocab)
        self.text_head = nn.Linear(model.dim, cfg.text_vocab)
        self.tokenizer = VisualTokenizer(cfg.tokenizer_config(model))
        self.tokenizer.requires_grad_(False)
        self.text_tokenizer, self.pool = None, None

    # --- data -------------------------------------------------------------------------------------
    def prepare(self, data, run_dir, log=print) -> None:
        """Fit (or load) the visual and text tokenizers on the data (a bounded sample of a streamed
        set), and tokenize the pool the text-only stream draws from: those captions and, with
        text_documents on a built corpus, as many documents' text (read by byte offset)."""
        from imagelm.data.sources import PREPARE_TEXTS

        if data.texts is None:
            raise ConfigError("beit3 trains on captioned images: set data.dataset to image-text (your shards with "
                              "KEY.txt captions), captions, scenes or captions+scenes")
        prepare_tokenizer(self.tokenizer, self.cfg, data, run_dir, log)
        pool = list(data.texts)
        if self.cfg.text_documents and data.corpus is not None:
            from imagelm.data import corpora
            pool += corpora.document_texts("train", **data.corpus, limit=PREPARE_TEXTS)
        self.load_tokenizer(run_dir, pool, log)
        self.pool = self.tokenize(pool).to(torch.int32)                                  # (P, L)
        log(f"beit3: samples as image : text : pair = {':'.join(f'{m:g}' for m in self.cfg.mix)}, text-only "
            f"stream from a pool of {len(pool)} texts")

    def text_transform(self) -> "PairText":
        """Each sample's caption -> "text" (L,) tokens, and "text_only": a text of the pool (L,)."""
        if self.pool is None:
            raise RuntimeError("BEiT-3 has no text pool: call prepare()")
        return PairText(self.text_tokenizer, self.cfg.context_length, self.pool)

    def load_tokenizer(self, run_dir, texts: list[str] | None = None, log=print) -> None:
        self.set_tokenizer(load_or_train(self.cfg.text_tokenizer, self.cfg.text_vocab, texts, run_dir, log))

    # --- an export keeps the shared blocks (all experts) and the text embeddings ----------------
    def export_parts(self) -> tuple[str, ...]:
        return "encoder", "text_embed", "text_pos"

    def tokenizer_setting(self) -> str:
        return self.cfg.text_tokenizer

    def get_tokenizer(self):
        return self.text_tokenizer

    def set_tokenizer(self, tok) -> None:
        self.text_tokenizer = tok

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.text_tokenizer is None:
            raise RuntimeError("BEiT-3 has no text tokenizer: call prepare() or load_tokenizer(run_dir)")
        return self.text_tokenizer.encode(texts, self.cfg.context_length)

    # --- the method, step by step -------------------------------------------------------------
    def roles(self, u: torch.Tensor) -> torch.Tensor:
        """(B,) uniforms -> what each sample is used as: IMAGE, TEXT or PAIR, in the mix's shares."""
        mix = torch.tensor(self.cfg.mix, dtype=torch.float64)
        edges = (mix.cumsum(0) / mix.sum())[:-1].to(u.device, u.dtype)
        return torch.bucketize(u.contiguous(), edges, right=True)

    def mask_image(self, u: torch.Tensor) -> torch.Tensor:
        """(B,) seeds -> (B, K) 0/1 block masks, exactly `count` patches each."""
        return block_masks(u, self.encoder.grid, self.count, self.min_block, self.cfg.aspect)

    @staticmethod
    def mask_text(tokens: torch.Tensor, u: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace round(ratio * n) of each text's n words (not <|endoftext|> or padding; at least
        one) by <mask>, those with the lowest noise u (B, L). Returns (masked tokens, where (B, L))."""
        words = (tokens != PAD_ID) & (tokens != EOT_ID)
        n = words.sum(1)
        count = torch.minimum((ratio * n).round().clamp(min=1), n)                  # (B,)
        rank = u.masked_fill(~words, 2.0).argsort(1).argsort(1)                     # words rank first
        where = rank < count[:, None]
        return tokens.masked_fill(where, MASK_ID), where

    def embed_image(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, K, D); masked patches become the [MASK] embedding (at their position)."""
        x = self.encoder.embed(images)
        if mask is None:
            return x
        tok = (self.mask_token + self.encoder.pos_embed).to(x.dtype)
        return torch.where(mask[..., None].bool(), tok, x)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, D): token + learned position embeddings."""
        return self.text_embed(tokens) + self.text_pos[:tokens.shape[1]]

    def encode(self, x: torch.Tensor, modality: list[int], pad: torch.Tensor | None = None,
               fuse: bool = False) -> torch.Tensor:
        """Embedded tokens (B, N, D) -> (B, N, D); padding (B, N) is never attended to."""
        keep = None if pad is None or not pad.any() else ~pad[:, None, None, :]      # (B, 1, 1, N)
        return self.encoder(x, keep, modality=modality, fuse=fuse)

    def loss(self, preds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], batch: int) -> torch.Tensor:
        """Cross-entropy averaged over each sample's masked patches and words, then over the batch's
        samples: a sample's share does not depend on how many tokens the other samples of its rank
        mask, so any split of the batch over ranks or micro-batches gives one process's loss.
        preds: (logits (n, V), targets (n,), the sample each of the n comes from (n,))."""
        total = torch.zeros(batch, device=preds[0][0].device)
        count = torch.zeros(batch, device=total.device)
        for logits, target, rows in preds:
            total = total.index_add(0, rows, F.cross_entropy(logits.float(), target, reduction="none"))
            count = count.index_add(0, rows, torch.ones_like(rows, dtype=total.dtype))
        return (total / count.clamp(min=1)).sum() / batch

    def forward(self, batch: dict) -> Output:
        images, noise = batch["image"], batch["noise"]
        K, L = self.encoder.num_patches, self.cfg.context_length
        role = self.roles(noise[:, 0])
        vis = self.mask_image(noise[:, 1])                                           # (B, K)
        preds, metrics = {}, {}
        codes = self.tokenizer.encode(images) if (role != TEXT).any() else None      # (B, K)
        def rows(s, w):       # the batch row of each selected token: (n,)
            return s.nonzero()[:, 0][w.nonzero()[:, 0]]

        if (s := role == IMAGE).any():
            h = self.encode(self.embed_image(images[s], vis[s]), [VISION] * K)
            w = vis[s].bool()
            preds["image"] = (self.image_head(h[w]), codes[s][w], rows(s, w))
        if (s := role == TEXT).any():
            tokens = batch["text_only"][s]
            masked, w = self.mask_text(tokens, noise[s, 2:], self.cfg.text_mask_ratio)
            h = self.encode(self.embed_text(masked), [LANGUAGE] * L, masked == PAD_ID)
            preds["text"] = (self.text_head(h[w]), tokens[w], rows(s, w))
        if (s := role == PAIR).any():
            tokens = batch["text"][s]
            masked, wt = self.mask_text(tokens, noise[s, 2:], self.cfg.pair_text_mask_ratio)
            x = torch.cat([self.embed_image(images[s], vis[s]), self.embed_text(masked)], 1)   # (b, K + L, D)
            pad = torch.cat([torch.zeros_like(vis[s], dtype=torch.bool), masked == PAD_ID], 1)
            h = self.encode(x, [VISION] * K + [LANGUAGE] * L, pad, fuse=True)
            wi = vis[s].bool()
            preds["pair_image"] = (self.image_head(h[:, :K][wi]), codes[s][wi], rows(s, wi))
            preds["pair_text"] = (self.text_head(h[:, K:][wt]), tokens[wt], rows(s, wt))
        loss = self.loss(list(preds.values()), len(images))
        for name, (logits, target, _) in preds.items():
            metrics[f"{name}_acc"] = (logits.argmax(-1) == target).float().mean()
        if dist.world_size() > 1 and len(preds) < 4:
            # a rank whose batch lacks a use leaves experts or heads unused; DDP wants a (zero) gradient
            loss = loss + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        return Output(loss, metrics)

    # --- downstream: one backbone, three encoders ---------------------------------------------
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): the vision path (the plain ViT), mean-pooled."""
        return self.encode(self.embed_image(images), [VISION] * self.encoder.num_patches).mean(1)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, D): the language path, mean over the text's tokens."""
        pad = tokens == PAD_ID
        h = self.encode(self.embed_text(tokens), [LANGUAGE] * tokens.shape[1], pad)
        return _masked_mean(h, ~pad)

    def pair_features(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, L) -> (B, D): the fusion path over image and text, mean-pooled."""
        K = self.encoder.num_patches
        pad = torch.cat([torch.zeros(len(tokens), K, dtype=torch.bool, device=tokens.device), tokens == PAD_ID], 1)
        x = torch.cat([self.embed_image(images), self.embed_text(tokens)], 1)
        h = self.encode(x, [VISION] * K + [LANGUAGE] * tokens.shape[1], pad, fuse=True)
        return _masked_mean(h, ~pad)


class PairText:
    """The loader's per-sample text transform: a caption -> {"text": its tokens (L,), "text_only":
    the pool's text at u[0] (L,)}; pool: (P, L) int32, tokenized once, shared by forked workers."""

    def __init__(self, tokenizer, context_length: int, pool: torch.Tensor):
        self.tok, self.L, self.pool = tokenizer, context_length, pool

    def __call__(self, text: str, u) -> dict[str, torch.Tensor]:
        if not isinstance(text, str):
            raise TypeError(f"expected a caption, got a {type(text).__name__}")
        i = min(int(float(u[0]) * len(self.pool)), len(self.pool) - 1)
        return {"text": self.tok.encode_one(text, self.L), "text_only": self.pool[i].long()}


def _masked_mean(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (B, N) bool -> (B, D)."""
    w = keep[..., None].to(h.dtype)
    return (h * w).sum(1) / w.sum(1).clamp(min=1)
