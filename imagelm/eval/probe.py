"""Probes on frozen features: linear (logistic regression, L2 chosen on held-out train images),
attentive (AIM: BatchNorm without affine -> one learned query -> linear), and k-NN (cosine,
distance-weighted vote)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imagelm.nn.heads import AttentionPool


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def standardize(train: torch.Tensor, *others: torch.Tensor):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(t - mu) / sd for t in (train, *others)]


def fit_logreg(x: torch.Tensor, y: torch.Tensor, classes: int, wd: float, iters: int = 300,
               init: nn.Linear | None = None) -> nn.Linear:
    """Multinomial logistic regression, full batch, L-BFGS; loss = CE + wd/2 |W|^2. Starts from
    zeros, or from `init` (a warm start along a regularisation path)."""
    clf = nn.Linear(x.shape[1], classes)
    if init is None:
        nn.init.zeros_(clf.weight)
        nn.init.zeros_(clf.bias)
    else:
        clf.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + 0.5 * wd * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def logreg_path(x: torch.Tensor, y: torch.Tensor, classes: int, wds, iters: int = 300) -> dict[float, nn.Linear]:
    """One fit per L2 strength, from the strongest down, each warm-started from the one before:
    weakly regularised fits on correlated features take ~1,000 L-BFGS steps to converge from zeros
    (100 left iGPT's probe 1.7 points short); along the path each fit starts near its optimum."""
    fits, clf = {}, None
    for wd in sorted(set(wds), reverse=True):
        fits[wd] = clf = fit_logreg(x, y, classes, wd, iters, init=clf)
    return fits


def linear_probe(train_x, train_y, test_x, test_y, classes: int, wds=(1e-2, 1e-3, 1e-4, 1e-5, 0.0),
                 val_size: int = 5000, iters: int = 300) -> dict:
    """Choose the L2 strength on the last `val_size` training images, refit on all of train
    (warm-started from the chosen fit), report test accuracy. Features are standardised with
    train statistics."""
    train_x, test_x = standardize(train_x.float(), test_x.float())
    fit_x, fit_y, val_x, val_y = train_x[:-val_size], train_y[:-val_size], train_x[-val_size:], train_y[-val_size:]
    fits = logreg_path(fit_x, fit_y, classes, wds, iters)
    with torch.no_grad():
        val = {wd: accuracy(clf(val_x), val_y) for wd, clf in fits.items()}
    wd = max(val, key=val.get)
    clf = fit_logreg(train_x, train_y, classes, wd, iters, init=fits[wd])
    with torch.no_grad():
        acc = accuracy(clf(test_x), test_y)
    return {"acc": acc, "val_acc": val[wd], "wd": wd}


class AttentiveProbe(nn.Module):
    def __init__(self, dim: int, classes: int, heads: int = 8):
        super().__init__()
        heads = math.gcd(heads, dim)
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.pool = AttentionPool(dim, heads)
        self.fc = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        x = self.norm(tokens.float().reshape(B * N, D)).view(B, N, D)
        return self.fc(self.pool(x))


def attentive_probe(train_t, train_y, test_t, test_y, classes: int, epochs: int = 10, lr: float = 1e-3,
                    heads: int = 8, batch_size: int = 256, wd: float = 0.05, seed: int = 0) -> dict:
    """AdamW with a cosine schedule on frozen tokens (N, K, D); test accuracy after the last epoch."""
    torch.manual_seed(seed)
    probe = AttentiveProbe(train_t.shape[-1], classes, heads)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(len(train_t) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        probe.train()
        for idx in torch.randperm(len(train_t), generator=g).split(batch_size):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(probe(train_t[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    probe.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.cat([probe(t) for t in test_t.split(1024)])
    return {"acc": accuracy(logits.float(), test_y)}


@torch.inference_mode()
def knn(train_x, train_y, test_x, test_y, classes: int, k: int = 20, t: float = 0.07) -> dict:
    """Cosine k-NN with exp(sim / t) weighted votes (as DINO's k-NN evaluation)."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    correct = 0
    for i in range(0, len(test_x), 1024):
        sim, idx = (test_x[i:i + 1024] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), classes).scatter_add_(1, train_y[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return {"acc": correct / len(test_x), "k": k}


def knn_probe(train_x, train_y, test_x, test_y, classes: int, k: int = 20, t: float = 0.07,
              val_size: int = 5000) -> dict:
    """k-NN test accuracy, plus its accuracy on the last `val_size` training images voted by the
    rest: the held-out figure a layer sweep chooses by, as the linear probe's."""
    val = knn(train_x[:-val_size], train_y[:-val_size], train_x[-val_size:], train_y[-val_size:], classes, k, t)
    return {**knn(train_x, train_y, test_x, test_y, classes, k, t), "val_acc": val["acc"]}


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred features (N, D): D when every
    direction is used equally, 1 when the features have collapsed onto a line (Roy & Vetterli)."""
    s = torch.linalg.svdvals(x.float() - x.float().mean(0))
    p = s / s.sum()
    return torch.exp(-(p * p.clamp(min=1e-12).log()).sum()).item()
