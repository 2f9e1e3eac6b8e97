"""End-to-end fine-tuning: the pretrained encoder + a classifier on its average-pooled, layer-normed
last-layer tokens, trained with AdamW (warmup + cosine). `gen_weight` > 0 keeps the method's own
pretraining loss on the same images (iGPT's joint objective L = L_clf + w * L_gen); `images`
limits the labelled training set (low-data regime)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from imagelm import dist
from imagelm.data.loader import BatchLoader
from imagelm.data.sources import ImageData
from imagelm.data.transforms import normalize
from imagelm.train import lr_at, param_groups


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, classes: int):
        super().__init__()
        self.encoder = encoder
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encoder.features(images)[0]                                  # (B, N, D), last block
        return self.fc(self.norm(z.mean(1)))


def finetune(method: nn.Module, train: ImageData, test: ImageData, data_cfg, ecfg, device, bf16: bool,
             log=print) -> dict:
    g = torch.Generator().manual_seed(0)
    n = ecfg.finetune_images or len(train)
    idx = torch.randperm(len(train), generator=g)[:n]
    subset = dataclasses.replace(train, images=train.images[idx], labels=train.labels[idx])
    dim = method.encoder.features(normalize(train.images[:1], train.mean, train.std).to(device))[0].shape[-1]
    torch.manual_seed(0)
    method.to(device)
    clf = Classifier(method.encoder, dim, len(train.classes)).to(device)
    params = nn.ModuleList([clf, method]) if ecfg.finetune_gen_weight else clf
    batch = min(ecfg.finetune_batch, n)
    loader = BatchLoader(subset, data_cfg, batch, seed=0, noise_dim=method.noise_dim, device=device)
    total = max(1, math.ceil(ecfg.finetune_epochs * loader.steps_per_epoch))
    amp = _amp(device, bf16)

    def loss_fn(b):
        loss = F.cross_entropy(clf(b["image"]).float(), b["label"])
        if ecfg.finetune_gen_weight:
            loss = loss + ecfg.finetune_gen_weight * method(b).loss
        return loss

    method.train()
    fit(params, loader, total, ecfg.finetune_lr, loss_fn, amp, log, "finetune")
    clf.eval()
    correct = 0
    with torch.inference_mode(), amp():
        for i in range(0, len(test), ecfg.batch_size):
            x = normalize(test.images[i:i + ecfg.batch_size], test.mean, test.std).to(device)
            correct += (clf(x).argmax(1).cpu() == test.labels[i:i + ecfg.batch_size]).sum().item()
    return {"acc": correct / len(test), "images": n, "epochs": ecfg.finetune_epochs, "steps": total,
            "gen_weight": ecfg.finetune_gen_weight}


def fit(params: nn.Module, loader: BatchLoader, steps: int, lr: float, loss_fn, amp, log=print,
        what: str = "finetune") -> None:
    """The fine-tuning loop every eval fine-tune shares: AdamW (wd 0.05 on matrices), warmup +
    cosine, gradient clipping at 1; loss_fn(batch) -> scalar loss."""
    sched = _Sched(lr=lr)
    opt = torch.optim.AdamW(param_groups(params, 0.05), lr=lr, betas=(0.9, 0.999))
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, sched)
        with amp():
            loss = loss_fn(loader.batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  {what} step {step}/{steps}: loss {loss.item():.4f}")


def _amp(device, bf16: bool):
    return lambda: dist.autocast(device, bf16)


@dataclasses.dataclass
class _Sched:            # the fields lr_at reads
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup: float = 0.1
