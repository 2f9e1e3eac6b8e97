"""Probes on frozen features, under one protocol: the train images are split once into `fit` and
`val` (shuffled, stratified by class, seeded); every choice a probe makes (layer, L2 strength,
learning rate) is made by fitting on `fit` and scoring `val`; then the chosen setting is refitted
on fit + val and scored once on test. A probe given no test set stops after its choices.

Linear: logistic regression on pooled tokens (L-BFGS along an L2 path). Attentive: AIM's probe
(BatchNorm without affine -> one learned query -> linear). k-NN: cosine, distance-weighted votes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imagelm.nn.heads import AttentionPool


@dataclass
class Split:
    fit: torch.Tensor      # (n_fit,) indices into the train set, shuffled
    val: torch.Tensor      # (n_val,) indices, stratified by class

    @property
    def train(self) -> torch.Tensor:
        """fit + val: what the chosen setting is refitted on."""
        return torch.cat([self.fit, self.val])


def split_train(labels: torch.Tensor, val_size: int, seed: int = 0) -> Split:
    """Hold out min(val_size, 20% of the images) for choices, stratified: the images are shuffled,
    stably sorted by class, and every (n / n_val)-th one is taken, so each class gives its share
    (to within one image) whatever order the data came in (an image folder is sorted by class)."""
    n = len(labels)
    if n < 2:
        raise ValueError(f"{n} labelled train image(s): a probe needs at least 2 (one to fit, one to validate)")
    n_val = max(1, min(val_size, n // 5))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    order = order[torch.sort(labels[order], stable=True).indices]           # shuffled within each class
    take = torch.zeros(n, dtype=torch.bool)
    take[(torch.arange(n_val) * n) // n_val] = True
    val, fit = order[take], order[~take]
    return Split(fit[torch.randperm(len(fit), generator=g)], val[torch.randperm(n_val, generator=g)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def standardize(train: torch.Tensor, *others: torch.Tensor):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(t - mu) / sd for t in (train, *others)]


class _Objective:
    """Mean cross-entropy + wd/2 |W|^2 of a linear softmax classifier, and its gradient, written
    out (no autograd graph). The images are taken in blocks of `block` rows, each read once while
    it is in cache for both its logits and its share of the gradient: with the whole set the
    features were read twice from memory per step, 1.6x slower on 60k x 192. The logits' matmul
    runs on the weights padded with zero rows to a multiple of 16 classes: (n, D) x (D, 10) is
    1.7x slower than (n, D) x (D, 16) on this CPU's BLAS. Each block's logits are then laid out
    (C, n), so the softmax runs along the long contiguous axis (over a 10-wide last axis
    PyTorch's CPU softmax is ~10x slower)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int, block: int = 8192):
        self.n, self.classes = x.shape[0], classes
        rows = -(-classes // 16) * 16
        self.Wp, self.bp = x.new_zeros(rows, x.shape[1]), x.new_zeros(rows)        # (C16, D), (C16,)
        self.blocks = [(xb, yb[None], F.one_hot(yb, classes).T.to(x.dtype))        # (n, D), (1, n), (C, n)
                       for xb, yb in zip(x.split(block), y.split(block))]

    def __call__(self, clf: nn.Linear, wd: float) -> torch.Tensor:
        W, b, C = clf.weight, clf.bias, self.classes
        with torch.no_grad():
            self.Wp[:C], self.bp[:C] = W, b
            gW, gb = W * wd, torch.zeros_like(b)
            loss = 0.5 * wd * W.pow(2).sum()
            for x, y, onehot in self.blocks:
                z = torch.addmm(self.bp, x, self.Wp.T)[:, :C].T.contiguous()       # (C, n)
                m = z.amax(0, keepdim=True)
                e = (z - m).exp_()
                s = e.sum(0, keepdim=True)
                loss += ((s.log() + m).sum() - z.gather(0, y).sum()) / self.n
                g = e.div_(s).sub_(onehot).div_(self.n)                             # dCE/dz (C, n)
                gW.addmm_(g, x)                                                     # (C, D)
                gb += g.sum(1)
            W.grad, b.grad = gW, gb
        return loss


def fit_logreg(x: torch.Tensor, y: torch.Tensor, classes: int, wd: float, iters: int = 300,
               init: nn.Linear | None = None, objective: _Objective | None = None) -> nn.Linear:
    """Multinomial logistic regression, full batch, L-BFGS; loss = CE + wd/2 |W|^2. Starts from
    zeros, or from `init` (a warm start along a regularisation path)."""
    f = objective or _Objective(x, y, classes)
    clf = nn.Linear(x.shape[1], classes).to(x.device)
    if init is None:
        nn.init.zeros_(clf.weight)
        nn.init.zeros_(clf.bias)
    else:
        clf.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)
    opt.step(lambda: f(clf, wd))
    return clf


def logreg_path(x: torch.Tensor, y: torch.Tensor, classes: int, wds, iters: int = 300) -> dict[float, nn.Linear]:
    """One fit per L2 strength, from the strongest down, each warm-started from the one before:
    weakly regularised fits on correlated features take ~1,000 L-BFGS steps to converge from zeros
    (100 left iGPT's probe 1.7 points short); along the path each fit starts near its optimum."""
    fits, clf, f = {}, None, _Objective(x, y, classes)
    for wd in sorted(set(wds), reverse=True):
        fits[wd] = clf = fit_logreg(x, y, classes, wd, iters, init=clf, objective=f)
    return fits


def _val_path(x, y, split: Split, classes: int, wds, iters: int, fit_idx=None):
    """The L2 path fitted on `fit` (or the subset `fit_idx` of it), scored on val: ({wd: acc}, fits)."""
    fit_idx = split.fit if fit_idx is None else fit_idx
    fits = logreg_path(x[fit_idx], y[fit_idx], classes, wds, iters)
    with torch.no_grad():
        return {wd: accuracy(clf(x[split.val]), y[split.val]) for wd, clf in fits.items()}, fits


def linear_probe(train: dict[int, torch.Tensor], y: torch.Tensor, split: Split, classes: int,
                 test: tuple[dict[int, torch.Tensor], torch.Tensor] | None = None, wds=(1e-2, 1e-3, 1e-4, 1e-5, 0.0),
                 iters: int = 300, select_images: int = 10000, log=print) -> dict:
    """Linear probe over the pooled features of several layers (layer -> (N, D)), choices on a
    subsample of `select_images` fit images (0 = all of fit):
    1. the layer: the L2 path fitted with a third of the iterations, scored on val;
    2. the L2 strength: the path at that layer, all iterations, scored on val;
    3. val_acc: the chosen setting fitted on all of fit (warm-started from step 2);
    4. acc: refitted on fit + val, scored once on test.
    `wds` are strengths for a fit on all of fit. A fit on m images uses wd * n_fit / m: the same
    penalty against the summed loss (sklearn's C), so a strength chosen on a subsample carries
    over. Features are standardised with train statistics."""
    device = y.device
    n_fit = len(split.fit)
    sub = split.fit[:select_images] if 0 < select_images < n_fit else split.fit
    on = {wd * n_fit / len(sub): wd for wd in wds}           # strength on the subsample -> on fit
    # a third: on aim-tiny's layer 4 (10k images), 100 L-BFGS steps gave val 81.76%, 300 gave 81.70%
    per_layer = {}
    if len(train) > 1:
        for layer, x in train.items():
            x = standardize(x.float().to(device))[0]
            per_layer[layer] = max(_val_path(x, y, split, classes, on, max(1, iters // 3), sub)[0].values())
            log(f"    linear layer {layer}: val {per_layer[layer]:.4f}")
    layer = max(per_layer, key=per_layer.get) if per_layer else next(iter(train))
    x, *tx = standardize(train[layer].float().to(device), *([test[0][layer].float().to(device)] if test else []))
    val, fits = _val_path(x, y, split, classes, on, iters, sub)
    sub_wd = max(val, key=val.get)
    wd, clf, val_acc = on[sub_wd], fits[sub_wd], val[sub_wd]
    if len(sub) < n_fit:
        clf = fit_logreg(x[split.fit], y[split.fit], classes, wd, iters, init=clf)
        with torch.no_grad():
            val_acc = accuracy(clf(x[split.val]), y[split.val])
    res = {"layer": layer, "wd": wd, "val_acc": val_acc, "select_images": len(sub),
           "per_layer": {str(l): a for l, a in (per_layer or {layer: val[sub_wd]}).items()},
           "per_wd": {f"{on[w]:g}": a for w, a in sorted(val.items())}}   # val of the subsample's fits
    if test:
        idx = split.train
        clf = fit_logreg(x[idx], y[idx], classes, wd * n_fit / len(idx), iters, init=clf)
        with torch.no_grad():
            res["acc"] = accuracy(clf(tx[0]), test[1].to(device))
    return res


class AttentiveProbe(nn.Module):
    """AIM's attentive probe: BatchNorm without affine -> attention pooling with one query -> linear.
    With one query, pooling is computed without projecting every token: q.(W_k x + b_k) =
    (W_k^T q).x + const, and sum_i a_i (W_v x_i + b_v) = W_v (sum_i a_i x_i) + b_v, so a token
    costs O(heads * D) instead of O(D^2). The BatchNorm folds in the same way (the normalised
    tokens are never formed): its shift is a constant of the softmax, and sum_i a_i = 1 carries it
    and the scale through the pooling. Past the pooling, the value projection and the linear head
    are one map (`maps`). The function and its parameters are those of BatchNorm1d followed by
    AttentionPool and the linear head (tested equal).

    The two matmuls that read every token (its logits, the weighted sum) run in `token_dtype`, the
    rest in fp32. bf16 halves what a step reads. The tokens enter centred on `shift` (their mean,
    set by train_attentive): a BatchNorm removes it anyway, and without it a channel's large mean
    would put a shared offset into every logit, which bf16 would round at the offset's scale."""

    def __init__(self, dim: int, classes: int, heads: int = 8, token_dtype: torch.dtype = torch.float32):
        super().__init__()
        heads = math.gcd(heads, dim)
        self.norm = nn.BatchNorm1d(dim, affine=False)     # holds the running statistics
        self.pool = AttentionPool(dim, heads)
        self.fc = nn.Linear(dim, classes)
        self.register_buffer("shift", torch.zeros(dim))
        self.token_dtype = token_dtype

    def stats(self, sums: tuple[torch.Tensor, torch.Tensor] | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) per channel of a batch of n tokens: the batch's in training, from its images'
        sums of their tokens and of their squares ((B, D) each, `token_sums`), and the running
        statistics updated as BatchNorm1d does; the running ones in eval."""
        bn = self.norm
        if not self.training:
            return bn.running_mean, (bn.running_var + bn.eps).rsqrt()
        mean = sums[0].sum(0) / n
        var = (sums[1].sum(0) / n).sub_(mean.square()).clamp_(min=0)     # biased, as BatchNorm normalises
        with torch.no_grad():
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * n / max(n - 1, 1), bn.momentum)  # unbiased, as BatchNorm keeps
            bn.num_batches_tracked += 1
        return mean, (var + bn.eps).rsqrt()

    def forward(self, tokens: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, C) of tokens (B, N, D) as extracted; sums: those of the centred tokens."""
        x = centred(tokens, self.shift, self.token_dtype)
        if self.training and sums is None:
            sums = token_sums(x)
        keys, W, b = maps([self], *self.stats(sums, x.shape[0] * x.shape[1]))
        return torch.addmm(b[0], attend(x, keys)[1].flatten(1), W[0].T)


def maps(probes: list[AttentiveProbe], mean: torch.Tensor | float, scale: torch.Tensor | float
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P probes past their BatchNorm (mean, scale), side by side, as maps of the centred tokens
    built from their parameters (with autograd): keys (P*h, D), whose dot with a token is its
    logit in each head; W (P, C, h*D) and b (P, C), the value projection and the linear head as
    one map of each head's attention-weighted token: a probe's logits are W @ those + b."""
    h, (C, D) = probes[0].pool.heads, probes[0].fc.weight.shape
    d = D // h

    def stack(param):
        return torch.stack([param(p) for p in probes])

    kv = stack(lambda p: p.pool.kv.weight).view(-1, 2, h, d, D)                        # (P, 2, h, d, D)
    keys = torch.einsum("phd,phdD->phD", stack(lambda p: p.pool.query).view(-1, h, d), kv[:, 0])   # (P, h, D)
    head = stack(lambda p: p.fc.weight).view(-1, C, h, d)                               # (P, C, h, d)
    W = torch.einsum("pchd,phdD->pchD", head, kv[:, 1]) * scale                         # (P, C, h, D)
    b = stack(lambda p: p.fc.bias) - (W * mean).sum((2, 3))
    if probes[0].pool.kv.bias is not None:
        b = b + torch.einsum("pchd,phd->pc", head, stack(lambda p: p.pool.kv.bias).view(-1, 2, h, d)[:, 1])
    return (keys * (scale / math.sqrt(d))).reshape(-1, D), W.reshape(len(probes), C, h * D), b


def attend(x: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head over each image's tokens, whose logits are keys . x: x (B, N, D), keys
    (H, D) -> the weights (B, H, N) and each head's weighted token (B, H, D), both fp32. The
    matmuls run in x's dtype, the softmax in fp32."""
    a = (keys.to(x.dtype) @ x.mT).softmax(-1, dtype=torch.float32)                  # (B, H, N)
    return a, (a.to(x.dtype) @ x).float()


def token_sums(tokens: torch.Tensor, block: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's sums of its tokens and of their squares, fp32 (N, D) each: the frozen tokens'
    share of a batch's BatchNorm statistics, computed once rather than at every step. In small
    blocks: 512 images of 49 x 192 ran 6x faster than 4096, whose 150 MB temporaries are fresh
    (page-faulted) memory every time."""
    parts = [(x.sum(1), x.square().sum(1)) for x in (t.float() for t in tokens.split(block))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def centred(tokens: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the attentive probe reads: tokens - shift, in dtype."""
    return (tokens - shift).to(dtype)      # one fp32 temporary: bf16 - fp32 promotes


def centre(tokens: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype | None = None, block: int = 512):
    """The mean (D,) of the tokens (N, K, D) of images `rows` and the token_sums of
    those images' centred tokens, and with dtype their centred tokens in it (else None): (shift,
    sums, centred). Block by block through reused buffers, the rows gathered there: a gathered copy
    of the set, and fresh temporaries for each block, were newly mapped memory whose page faults made
    this 2-3x slower."""
    n, blocks = len(rows), rows.split(block)
    raw = tokens.new_empty((min(block, n), *tokens.shape[1:]))
    buf = torch.empty(raw.shape, device=tokens.device)

    def read(r: torch.Tensor) -> torch.Tensor:
        return buf[:len(r)].copy_(torch.index_select(tokens, 0, r, out=raw[:len(r)]))

    total = buf.new_zeros(tokens.shape[-1])
    for r in blocks:
        total += read(r).sum((0, 1))
    shift = total / (n * tokens.shape[1])
    out = None if dtype is None else torch.empty((n, *tokens.shape[1:]), dtype=dtype, device=tokens.device)
    s1, s2 = [], []
    for i, r in zip(range(0, n, block), blocks):
        c = read(r).sub_(shift)
        s1.append(c.sum(1))
        if out is not None:
            out[i:i + block] = c
        s2.append(c.square_().sum(1))
    return shift, (torch.cat(s1), torch.cat(s2)), out


# train_attentive keeps a centred copy of the tokens in the probes' token dtype when it is at most
# this size (60k images x 49 x 192 is 2.3 GB in fp32), and beyond it centres them batch by batch
TOKEN_COPY_MAX_BYTES = 4 << 30


def probes_loss(x: torch.Tensor, y: torch.Tensor, keys: torch.Tensor, W: torch.Tensor, b: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The summed mean cross-entropy of P attentive probes on a batch of centred tokens x (B, N, D)
    with labels y, and its gradient with respect to their `maps` (keys, W, b). Written out, as the
    tokens are frozen (no graph over the batch): with the fused AdamW, a step of 3 probes on
    aim-tiny's tokens took 8.2 ms where autograd's had taken 10.4."""
    B, N, D = x.shape
    P = W.shape[0]
    a, pooled = attend(x, keys)                                                      # (B, P*h, N), (B, P*h, D)
    p = pooled.view(B, P, -1).transpose(0, 1)                                        # (P, B, h*D)
    logp = torch.baddbmm(b[:, None], p, W.mT).log_softmax(-1)                        # (P, B, C)
    t = y.view(1, B, 1).expand(P, B, 1)
    loss = -logp.gather(2, t).sum() / B
    g = logp.exp_().scatter_add_(2, t, logp.new_full(t.shape, -1.0)).div_(B)         # dloss/dlogits (P, B, C)
    da = (torch.bmm(g, W).transpose(0, 1).reshape(B, -1, D).to(x.dtype) @ x.mT).float()   # dloss/da (B, P*h, N)
    dz = a * (da - (a * da).sum(-1, keepdim=True))                                   # through the softmax
    dk = (dz.to(x.dtype).transpose(0, 1).reshape(-1, B * N) @ x.reshape(B * N, D)).float()
    return loss, (dk, torch.bmm(g.mT, p), g.sum(1))


class _Together(nn.Module):
    """Several attentive probes trained on the same batches (one per learning rate): each token
    is read once per step for all of them, their heads' keys side by side. Each probe's output
    and gradients are those of training it alone."""

    def __init__(self, probes: list[AttentiveProbe]):
        super().__init__()
        self.probes = nn.ModuleList(probes)

    def forward(self, sums: tuple[torch.Tensor, torch.Tensor], n: int):
        """The probes' maps for a batch of n tokens whose images' sums are `sums`."""
        stats = [p.stats(sums, n) for p in self.probes]     # equal (one batch); each keeps its running ones
        return maps(list(self.probes), *stats[0])


def train_attentive(tokens, y, classes: int, epochs: int, lrs: float | tuple[float, ...], heads: int = 8,
                    batch_size: int = 256, wd: float = 0.05, seed: int = 0, token_dtype: torch.dtype = torch.float32,
                    rows: torch.Tensor | None = None) -> AttentiveProbe | list[AttentiveProbe]:
    """AdamW with a one-cycle (warmup + cosine) schedule on frozen tokens (N, K, D) and labels (N,)
    of the images `rows` (default all): one probe, or one per learning rate in `lrs` (trained
    together: the same init and batches, as if alone). token_dtype: of the probes' matmuls over the
    tokens (bf16 where the hardware has it)."""
    single = isinstance(lrs, (int, float))
    rates = (lrs,) if single else tuple(lrs)
    rows = torch.arange(len(tokens), device=tokens.device) if rows is None else rows.to(tokens.device)
    y, n = y.to(tokens.device).index_select(0, rows), len(rows)
    # per step, the BatchNorm statistics come from the images' token sums (1.4x faster a step than
    # squaring the batch), and the batch is gathered from a centred copy where one fits
    fits = n * tokens[0].numel() * token_dtype.itemsize <= TOKEN_COPY_MAX_BYTES
    shift, sums, copy = centre(tokens, rows, token_dtype if fits else None)
    batch = (lambda idx: copy.index_select(0, idx)) if fits else \
        (lambda idx: centred(tokens.index_select(0, rows.index_select(0, idx)), shift, token_dtype))
    probes = []
    for _ in rates:
        torch.manual_seed(seed)
        probes.append(AttentiveProbe(tokens.shape[-1], classes, heads, token_dtype).to(tokens.device))
        probes[-1].shift.copy_(shift)
    model = _Together(probes)
    # fused: one kernel per probe's parameters; the per-tensor ops of the default took ~1 ms a step
    opt = torch.optim.AdamW([{"params": p.parameters(), "lr": lr} for p, lr in zip(probes, rates)], weight_decay=wd,
                            fused=tokens.device.type in ("cpu", "cuda"))
    steps = epochs * math.ceil(n / batch_size)
    # a warmup of 10%; OneCycleLR divides by (warmup steps - 1), so a run of 10 steps or fewer (a fit
    # set of <= 256 images at 10 epochs) warms up over 2 steps, and one of 1 or 2 keeps a constant lr
    warmup = 0.1 if steps > 10 else min(0.5, 2 / steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, list(rates), total_steps=steps, pct_start=warmup) \
        if steps > 2 else None
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=g).split(batch_size):
            idx = idx.to(tokens.device)      # index_select: ~10x faster than tokens[idx] on CPU
            mapped = model(tuple(s.index_select(0, idx) for s in sums), len(idx) * tokens.shape[1])
            _, grads = probes_loss(batch(idx), y.index_select(0, idx), *(m.detach() for m in mapped))
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(mapped, grads)
            opt.step()
            if sched:
                sched.step()
    model.eval()
    return probes[0] if single else probes


@torch.inference_mode()
def predict(probe: AttentiveProbe, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([probe(t) for t in tokens.split(1024)])


def attentive_probe(tokens: torch.Tensor, y: torch.Tensor, split: Split, classes: int,
                    test: tuple[torch.Tensor, torch.Tensor] | None = None, epochs: int = 10, lrs=(1e-2,),
                    heads: int = 8, batch_size: int = 256, token_dtype: torch.dtype = torch.float32,
                    log=print) -> dict:
    """Train on the fit images with each learning rate (together), choose the one best on val,
    retrain on fit + val with it and score test. Tokens are (N, K, D). The lrs are ranked at the
    scale of the final fit, not on a subsample as the linear probe's layers are: an lr ranked by 10
    epochs of 10,000 images (390 steps against the refit's 2,350) did not keep its rank, e.g. on
    mae-tiny's val 3e-2 led 1e-2 by 0.14 points there and trailed it by 0.66 trained on all of fit."""
    val, val_x, val_y = {}, tokens[split.val], y[split.val]
    for lr, probe in zip(lrs, train_attentive(tokens, y, classes, epochs, tuple(lrs), heads, batch_size,
                                              token_dtype=token_dtype, rows=split.fit)):
        val[lr] = accuracy(predict(probe, val_x), val_y)
        if len(lrs) > 1:
            log(f"    attentive lr {lr:g}: val {val[lr]:.4f}")
    lr = max(val, key=val.get)
    res = {"lr": lr, "val_acc": val[lr], "per_lr": {f"{l:g}": a for l, a in val.items()}}
    if test:
        probe = train_attentive(tokens, y, classes, epochs, lr, heads, batch_size, token_dtype=token_dtype,
                                rows=split.train)
        res["acc"] = accuracy(predict(probe, test[0]), test[1].to(tokens.device))
    return res


@torch.inference_mode()
def knn(train_x, train_y, test_x, test_y, classes: int, k: int = 20, t: float = 0.07) -> dict:
    """Cosine k-NN with exp(sim / t) weighted votes (as DINO's k-NN evaluation)."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    k = min(k, len(train_x))
    correct = 0
    # one similarity buffer for every block: a fresh (1024, 55k) product is 225 MB of newly mapped
    # memory each time, and its page faults made the k-NN 1.4x slower
    buf = test_x.new_empty(min(1024, len(test_x)), len(train_x))
    for i in range(0, len(test_x), 1024):
        q = test_x[i:i + 1024]
        sim, idx = torch.mm(q, train_x.T, out=buf[:len(q)]).topk(k, dim=1)
        votes = torch.zeros(len(idx), classes, device=sim.device).scatter_add_(1, train_y[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return {"acc": correct / len(test_x), "k": k}


def knn_probe(train: dict[int, torch.Tensor], y: torch.Tensor, split: Split, classes: int,
              test: tuple[dict[int, torch.Tensor], torch.Tensor] | None = None, k: int = 20, t: float = 0.07,
              log=print) -> dict:
    """k-NN over the pooled features of several layers: the layer whose val images are best voted
    by the fit images is chosen; test images are then voted by fit + val."""
    device = y.device
    per_layer = {}
    for layer, x in train.items():
        x = x.to(device)
        per_layer[layer] = knn(x[split.fit], y[split.fit], x[split.val], y[split.val], classes, k, t)["acc"]
    layer = max(per_layer, key=per_layer.get)
    res = {"layer": layer, "k": min(k, len(split.fit)), "val_acc": per_layer[layer],
           "per_layer": {str(l): a for l, a in per_layer.items()}}
    if test:
        x, idx = train[layer].to(device), split.train
        res["acc"] = knn(x[idx], y[idx], test[0][layer].to(device), test[1].to(device), classes, k, t)["acc"]
    return res


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred features (N, D): D when every
    direction is used equally, 1 when the features have collapsed onto a line (Roy & Vetterli)."""
    s = torch.linalg.svdvals(x.float() - x.float().mean(0))
    p = s / s.sum()
    return torch.exp(-(p * p.clamp(min=1e-12).log()).sum()).item()
