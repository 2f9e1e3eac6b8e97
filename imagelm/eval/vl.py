"""Image-text fine-tunes for a backbone whose image and text paths were not trained into one space
(BEiT-3), through the shared fine-tuning loop:

- retrieval (and zero-shot): a short contrastive fine-tune of the two single-modality paths
  (`image_features`, `text_features`) with fresh projections, as BEiT-3 does for retrieval;
- image-text matching: a binary head on the fusion path (`pair_features`) fine-tuned on scenes
  and their hard negatives (the same words, a wrong arrangement or item), scored on held-out scenes.
"""
from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from imagelm.data import corpora
from imagelm.data.loader import BatchLoader
from imagelm.data.sources import ImageData, resize
from imagelm.data.transforms import normalize
from imagelm.eval.finetune import _amp, fit
from imagelm.methods.clip import contrastive_loss


class TwoTower(nn.Module):
    """encode_image / encode_text / tokenize (what zeroshot.py reads) over a model's
    single-modality paths, through projections to a joint space."""

    def __init__(self, method: nn.Module, dim: int, embed_dim: int = 256, init_temperature: float = 0.07):
        super().__init__()
        self.method, self.tokenize = method, method.tokenize
        self.image_proj = nn.Linear(dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.method.image_features(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.method.text_features(tokens)), dim=-1)

    def forward(self, batch: dict) -> torch.Tensor:
        return contrastive_loss(self.encode_image(batch["image"]), self.encode_text(batch["text"]), self.logit_scale)[0]


def contrastive_finetune(method: nn.Module, pairs: ImageData, data_cfg, ecfg, device, bf16: bool,
                         log=print) -> TwoTower:
    """Fit TwoTower(method) on captioned images `pairs` (texts set) for ecfg.vl_steps steps."""
    torch.manual_seed(0)
    dim = method.image_features(normalize(pairs.images[:1], pairs.mean, pairs.std).to(device)).shape[-1]
    model = TwoTower(method, dim).to(device)
    data = dataclasses.replace(pairs, extras={"text": method.tokenize(pairs.texts)})
    loader = BatchLoader(data, data_cfg, min(ecfg.vl_batch, len(data)), seed=0, device=device)
    model.train()
    fit(model, loader, ecfg.vl_steps, ecfg.vl_lr, model, _amp(device, bf16), log, "contrastive fine-tune")
    return model.eval()


class Matcher(nn.Module):
    """Image-text matching: does this caption describe this image? Two logits on the fusion path."""

    def __init__(self, method: nn.Module, dim: int):
        super().__init__()
        self.method = method
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 2)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.method.pair_features(images, tokens)))


def scene_pairs(split: str, size: int, root: str | None, n: int | None, classes: list[str], seed: int = 0):
    """Scenes with their captions and one hard-negative caption each: (images, captions, negatives)."""
    c = corpora.load_corpus("scenes", split, root, n)
    rng = random.Random(f"itm-{split}-{seed}")
    return resize(c.images, size), c.captions, [corpora.mismatched_caption(m, classes, rng) for m in c.meta]


def itm(method: nn.Module, train: tuple, test: tuple, stats: ImageData, data_cfg, ecfg, device, bf16: bool,
        log=print) -> dict:
    """Fine-tune a Matcher on `train` scene pairs (each scene with its caption and a hard negative)
    and score it on `test`: accuracy over every (scene, caption) and (scene, negative) pair."""
    amp = _amp(device, bf16)
    torch.manual_seed(0)
    images, captions, negatives = train
    data = ImageData(images, torch.full((len(images),), -1), stats.classes, mean=stats.mean, std=stats.std,
                     extras={"text": method.tokenize(captions), "neg": method.tokenize(negatives)})
    x0 = normalize(images[:1], stats.mean, stats.std).to(device)
    model = Matcher(method, method.pair_features(x0, data.extras["text"][:1].to(device)).shape[-1]).to(device)

    def loss_fn(b):
        logits = model(torch.cat([b["image"], b["image"]]), torch.cat([b["text"], b["neg"]]))     # (2b, 2)
        target = torch.cat([torch.ones(len(b["image"])), torch.zeros(len(b["image"]))]).long().to(logits.device)
        return F.cross_entropy(logits.float(), target)

    loader = BatchLoader(data, data_cfg, min(ecfg.vl_batch, len(data)), seed=0, device=device)
    model.train()
    fit(model, loader, ecfg.vl_steps, ecfg.vl_lr, loss_fn, amp, log, "itm fine-tune")
    model.eval()
    images, captions, negatives = test
    pos, neg = method.tokenize(captions), method.tokenize(negatives)
    right = 0
    with torch.inference_mode(), amp():
        for i in range(0, len(images), ecfg.batch_size):
            x = normalize(images[i:i + ecfg.batch_size], stats.mean, stats.std).to(device)
            right += (model(x, pos[i:i + len(x)].to(device)).argmax(1) == 1).sum().item()
            right += (model(x, neg[i:i + len(x)].to(device)).argmax(1) == 0).sum().item()
    return {"acc": right / (2 * len(images)), "pairs": 2 * len(images), "steps": ecfg.vl_steps}

