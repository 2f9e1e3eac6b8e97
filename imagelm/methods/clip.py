"""CLIP: contrastive language-image pretraining (Radford et al. 2021; open_clip).

An image tower (the shared ViT, mean-pooled) and a text tower (a causal Transformer over BPE
tokens, read out at <|endoftext|>) are projected to one space; a symmetric InfoNCE over the
global batch pulls matching pairs together, with a learned temperature clamped at 1/100. Under
torchrun the features of every rank are gathered with their gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from imagelm import dist
from imagelm.config import POSITIVE, ConfigError, ModelConfig, Rule
from imagelm.methods.base import Method, Output, register
from imagelm.nn.contrastive import info_nce
from imagelm.nn.gpt import TokenTransformer
from imagelm.nn.vit import ViT
from imagelm.tokenizers.text import CaptionTokens, load_or_train


@dataclass
class CLIPConfig:
    embed_dim: Annotated[int, POSITIVE] = 512         # the joint space (ViT-B/32)
    context_length: Annotated[int, POSITIVE] = 77
    text_vocab: Annotated[int, POSITIVE] = 49408
                                 # BPE vocabulary (trained on the corpus; a small corpus gives fewer merges)
    text_dim: Annotated[int, POSITIVE] = 512
    text_depth: Annotated[int, POSITIVE] = 12
    text_heads: Annotated[int, POSITIVE] = 8
    init_temperature: Annotated[float, POSITIVE] = 0.07
    max_logit_scale: Annotated[float, POSITIVE] = 100.0   # temperature clamped at 1/100 (logit scale at ln 100)
    tokenizer: str = ""          # a saved text tokenizer; "" = RUN/text_tokenizer, trained on first use
    RULES: ClassVar[tuple[Rule, ...]] = (
        (lambda c: c.text_dim % c.text_heads == 0, "{w}text_dim must be a multiple of {w}text_heads"),)


@register("clip")
class CLIP(Method):
    Config = CLIPConfig
    couples_samples = True      # InfoNCE over every pair of the global batch
    export_leaves_out = "CLIP's text tower, projections and temperature (the image tower is exported)"

    def __init__(self, model: ModelConfig, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.noise_dim = 0
        self.encoder = ViT(model)
        self.text = TokenTransformer(cfg.text_vocab, cfg.context_length, cfg.text_dim, cfg.text_depth, cfg.text_heads,
                                     model.mlp_ratio, model.bias, model.norm_eps, causal=True)
        self.image_proj = nn.Linear(model.dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=model.dim ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text_dim ** -0.5)
        self.logit_scale = logit_scale(cfg.init_temperature, self)
        self.tokenizer, self.eot_id = None, 0

    def prepare(self, data, run_dir, log=print) -> None:
        """Load the BPE tokenizer, or train it on the captions (a bounded sample of a streamed set)."""
        if data.texts is None:
            raise ConfigError("clip trains on captioned images: set data.dataset to image-text (your shards with "
                              "KEY.txt captions), captions, scenes or captions+scenes")
        self.load_tokenizer(run_dir, data.texts, log)

    def text_transform(self) -> CaptionTokens:
        """Each sample's caption -> "text" (L,) tokens, in the loader's workers."""
        if self.tokenizer is None:
            raise RuntimeError("CLIP has no text tokenizer: call prepare() or load_tokenizer(run_dir)")
        return CaptionTokens(self.tokenizer, self.cfg.context_length)

    def load_tokenizer(self, run_dir, texts: list[str] | None = None, log=print) -> None:
        self.set_tokenizer(load_or_train(self.cfg.tokenizer, self.cfg.text_vocab, texts, run_dir, log))

    # --- an export keeps both towers, the projections and the temperature ---------------------
    def export_parts(self) -> tuple[str, ...]:
        return "encoder", "text", "image_proj", "text_proj", "logit_scale"

    def tokenizer_setting(self) -> str:
        return self.cfg.tokenizer

    def get_tokenizer(self):
        return self.tokenizer

    def set_tokenizer(self, tok) -> None:
        self.tokenizer, self.eot_id = tok, tok.eot_id

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("CLIP has no text tokenizer: call prepare() or load_tokenizer(run_dir)")
        return self.tokenizer.encode(texts, self.cfg.context_length)

    # --- the method, step by step -------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, E) unit vectors: mean of the final tokens, projected."""
        return F.normalize(self.image_proj(self.encoder(self.encoder.embed(images)).mean(1)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, E) unit vectors: the causal tower's state at <|endoftext|>, projected."""
        h = self.text(self.text.embed(tokens))                                       # (B, L, Dt)
        eot = (tokens == self.eot_id).int().argmax(-1)                               # first <|endoftext|>
        return F.normalize(self.text_proj(h[torch.arange(len(h)), eot]), dim=-1)

    def loss(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return contrastive_loss(img, txt, self.logit_scale, self.cfg.max_logit_scale)

    def forward(self, batch: dict) -> Output:
        loss, logits = self.loss(self.encode_image(batch["image"]), self.encode_text(batch["text"]))
        acc = (logits.argmax(1) == torch.arange(len(logits), device=logits.device)).float().mean()
        return Output(loss, {"i2t_acc": acc, "logit_scale": self.logit_scale.detach().exp()})


def logit_scale(init_temperature: float, owner: nn.Module) -> nn.Parameter:
    """ln(1 / temperature), learned, as a 1-element vector: FSDP shards no 0-d parameter. Weights
    saved when it was a scalar still load into `owner`."""
    def accept_scalar(module, state_dict, prefix, *args):
        key = prefix + "logit_scale"
        if key in state_dict and state_dict[key].ndim == 0:
            state_dict[key] = state_dict[key].reshape(1)
    owner.register_load_state_dict_pre_hook(accept_scalar)
    return nn.Parameter(torch.full((1,), math.log(1 / init_temperature)))


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     max_logit_scale: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over the global batch of unit vectors (B, E) x (B, E), gathered with
    their gradients across ranks; the temperature is exp(-logit_scale), at least 1/max_logit_scale.
    Returns (loss, logits (Bg, Bg))."""
    img, txt = dist.gather_with_grad(img), dist.gather_with_grad(txt)                  # (Bg, E)
    return info_nce(img, txt, torch.arange(len(img), device=img.device), logit_scale, max_logit_scale)
