"""Visual tokenizers: each image patch -> one discrete code, for BEiT targets and AIM's token
cross-entropy. Two kinds, one interface (`encode`, `decode`, saved with their config):

- kmeans: nearest centroid of k-means over (normalised) patches; the simple baseline.
- vq:     a VQ-VAE over patches: MLP encoder -> nearest code (codebook initialised by k-means,
          EMA updates, unused codes restarted from current latents) -> MLP decoder.
With `context` each code stands for a window of patches centred on its own, not the patch alone.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from imagelm.config import CHANNELS, NON_NEGATIVE, POSITIVE, Beta, Check, DataConfig
from imagelm.nn.embed import normalize_rows, normalized_patches

FORMAT_VERSION = 1


VOCAB = Check(lambda v: v >= 2, "be >= 2 (codes in the codebook)")


@dataclass
class TokenizerConfig:
    kind: Literal["vq", "kmeans"] = "vq"
    vocab: Annotated[int, VOCAB] = 8192   # BEiT's codebook size
    patch_size: Annotated[int, POSITIVE] = 16
    in_chans: Annotated[int, CHANNELS] = 3
    norm_pix: bool = True        # tokenize per-patch normalised pixels
    context: Annotated[int, NON_NEGATIVE] = 0   # neighbouring patches on each side a code also sees: a (2c+1)p-pixel
                                 # window, as DALL-E's conv encoder (BEiT's tokenizer) sees beyond its cell
    dim: Annotated[int, POSITIVE] = 32       # VQ latent size
    hidden: Annotated[int, POSITIVE] = 256   # VQ encoder/decoder MLP width
    beta: Annotated[float, NON_NEGATIVE] = 0.25   # commitment weight (VQ-VAE)
    ema: Beta = 0.99             # codebook EMA decay
    steps: Annotated[int, POSITIVE] = 2000
    batch_size: Annotated[int, POSITIVE] = 64   # images per step (x patches per image)
    lr: Annotated[float, POSITIVE] = 1e-3
    seed: int = 0


@dataclass
class TokenizerJob:
    """`imagelm tokenizer train`: defaults make a Fashion-MNIST tokenizer for the tiny recipes."""
    tokenizer: TokenizerConfig = dataclasses.field(
        default_factory=lambda: TokenizerConfig(vocab=512, patch_size=4, in_chans=1))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    img_size: Annotated[int, POSITIVE] = 28


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(..., d) rows -> (...) index of the nearest row of c (K, d), in fp32 under any autocast (bf16
    distances pick another row for ~1% of them). |c|^2 - 2 x.c in one addmm, as |x|^2 is the same for
    every row of c: for BEiT's targets this is most of their cost per step."""
    with torch.autocast(x.device.type, enabled=False):
        flat, c = x.reshape(-1, x.shape[-1]).float(), c.float()
        return torch.addmm(c.pow(2).sum(1), flat, c.T, alpha=-2).min(1).indices.view(x.shape[:-1])  # (N, K)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on rows of x (N, d), k-means++-lite init (random distinct rows); empty
    clusters are re-seeded with the points farthest from their centroid. Returns (k, d)."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        d = torch.cdist(x, c)
        assign = d.argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = d.gather(1, assign[:, None]).squeeze(1).topk(len(empty)).indices
            c[empty] = x[far]
    return c


class VisualTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        P = self.in_dim = ((2 * cfg.context + 1) * cfg.patch_size) ** 2 * cfg.in_chans
        if cfg.kind == "vq":
            self.enc = nn.Sequential(nn.Linear(P, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))
            self.dec = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, P))
            code_dim = cfg.dim
        else:
            self.enc = self.dec = nn.Identity()
            code_dim = P
        self.register_buffer("codebook", torch.zeros(cfg.vocab, code_dim))
        self.register_buffer("ema_count", torch.zeros(cfg.vocab))
        self.register_buffer("ema_sum", torch.zeros(cfg.vocab, code_dim))

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> what each code stands for, (B, K, P): its patch, or with `context` the
        window centred on it (edges padded by replication), normalised if norm_pix."""
        c, p = self.cfg.context, self.cfg.patch_size
        if not c:
            return normalized_patches(images, p, self.cfg.norm_pix)
        padded = F.pad(images.float(), (c * p,) * 4, mode="replicate")
        x = F.unfold(padded, (2 * c + 1) * p, stride=p).transpose(1, 2)         # (B, K, C * w * w)
        return normalize_rows(x) if self.cfg.norm_pix else x

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) latents -> (...) nearest code indices."""
        return nearest(z, self.codebook)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) codes, in fp32 under any autocast: targets are the codes the
        tokenizer was trained and measured with (bf16 distances pick another code for ~1% of latents)."""
        with torch.autocast(images.device.type, enabled=False):
            return self.quantize(self.enc(self.patches(images).float()))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K) codes -> (B, K, P) patches (normalised if norm_pix)."""
        return self.dec(self.codebook[codes])

    # --- training --------------------------------------------------------------------------------
    def vq_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, P) patches -> (reconstruction + beta * commitment loss, codes); straight-through
        gradients; the codebook itself moves by EMA in `ema_update`."""
        z = self.enc(x)
        codes = self.quantize(z.detach())
        q = self.codebook[codes]
        zq = z + (q - z).detach()
        loss = F.mse_loss(self.dec(zq), x) + self.cfg.beta * F.mse_loss(z, q)
        return loss, codes

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, codes: torch.Tensor, generator: torch.Generator) -> None:
        decay = self.cfg.ema
        onehot_sum = torch.zeros_like(self.ema_sum).index_add_(0, codes, z.float())
        counts = torch.bincount(codes, minlength=self.cfg.vocab).float()
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(onehot_sum, alpha=1 - decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.cfg.vocab * 1e-5) * n      # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        dead = (self.ema_count < 1e-3).nonzero().flatten()
        if len(dead):    # restart unused codes at random current latents
            pick = torch.randint(0, len(z), (len(dead),), generator=generator)
            self.codebook[dead] = z[pick].float()
            self.ema_sum[dead] = z[pick].float()
            self.ema_count[dead] = 1.0


def train_tokenizer(cfg: TokenizerConfig, train_images: torch.Tensor, minutes: float | None = None,
                    log=print) -> VisualTokenizer:
    """Fit a tokenizer on float images (N, C, H, W) (already standardised)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    tok = VisualTokenizer(cfg)
    sample = train_images[torch.randperm(len(train_images), generator=g)[:4096]]
    patches = tok.patches(sample).reshape(-1, tok.in_dim)
    subset = patches[torch.randperm(len(patches), generator=g)[:50_000]]
    if cfg.kind == "kmeans":
        tok.codebook.copy_(kmeans(subset, cfg.vocab, seed=cfg.seed))
        return tok
    opt = torch.optim.Adam([p for n, p in tok.named_parameters()], lr=cfg.lr)
    with torch.no_grad():
        tok.codebook.copy_(kmeans(tok.enc(subset), cfg.vocab, iters=10, seed=cfg.seed))
        tok.ema_sum.copy_(tok.codebook)
        tok.ema_count.fill_(1.0)
    deadline = time.time() + minutes * 60 if minutes else None
    for step in range(cfg.steps):
        if deadline and time.time() > deadline:
            break
        idx = torch.randint(0, len(train_images), (cfg.batch_size,), generator=g)
        x = tok.patches(train_images[idx]).reshape(-1, patches.shape[1])
        loss, codes = tok.vq_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tok.ema_update(tok.enc(x).detach(), codes, g)
        if step % 200 == 0 or step == cfg.steps - 1:
            log(f"  tokenizer step {step}: loss {loss.item():.4f}")
    return tok


@torch.no_grad()
def tokenizer_stats(tok: VisualTokenizer, images: torch.Tensor) -> dict:
    """codebook_usage: fraction of codes used on these images; recon_mse: on (normalised) patches."""
    used, err, n = torch.zeros(tok.cfg.vocab, dtype=torch.bool), 0.0, 0
    for batch in images.split(1024):
        codes = tok.encode(batch)
        used[codes.unique()] = True
        x = tok.patches(batch)
        err += F.mse_loss(tok.decode(codes), x, reduction="sum").item()
        n += x.numel()
    return {"codebook_usage": used.float().mean().item(), "recon_mse": err / n}


def save_tokenizer(tok: VisualTokenizer, path: Path, stats: dict | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tok.state_dict().items()}, str(tmp / "tokenizer.safetensors"))
    meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(tok.cfg), "stats": stats or {}}
    (tmp / "tokenizer.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_tokenizer(path: Path) -> VisualTokenizer:
    from imagelm.config import build
    meta = yaml.safe_load((Path(path) / "tokenizer.yaml").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: tokenizer format {meta.get('format_version')}, this imagelm reads {FORMAT_VERSION}")
    tok = VisualTokenizer(build(TokenizerConfig, meta["config"], "tokenizer."))
    tok.load_state_dict(load_file(str(Path(path) / "tokenizer.safetensors")))
    return tok


@dataclass
class TokenTargets:
    """Config fields of a method whose targets are visual-token codes (BEiT, AIM token_ce)."""
    tokenizer: str = ""          # a saved tokenizer folder; "" = RUN/tokenizer, trained on first use
    tokenizer_kind: Literal["vq", "kmeans"] = "vq"
    vocab: Annotated[int, VOCAB] = 8192
    tokenizer_steps: Annotated[int, POSITIVE] = 2000
    tokenizer_norm_pix: bool = True   # tokenize per-patch normalised pixels (BEiT's dVAE sees raw pixels)
    tokenizer_context: Annotated[int, NON_NEGATIVE] = 0   # neighbouring patches each code also sees (as .context)

    def tokenizer_config(self, model) -> TokenizerConfig:
        """The tokenizer these targets call for, on the backbone's patches."""
        return TokenizerConfig(kind=self.tokenizer_kind, vocab=self.vocab, patch_size=model.patch_size,
                               in_chans=model.in_chans, norm_pix=self.tokenizer_norm_pix,
                               context=self.tokenizer_context, steps=self.tokenizer_steps)


def prepare_tokenizer(tok: VisualTokenizer, cfg: TokenTargets, data, run_dir: Path, log=print) -> None:
    """Load the configured tokenizer into `tok`, or train one on the run's data and save it
    (a recipe that needs a tokenizer and has none trains one first)."""
    from imagelm.data.transforms import normalize

    path = Path(cfg.tokenizer) if cfg.tokenizer else Path(run_dir) / "tokenizer"
    if (path / "tokenizer.yaml").exists():
        loaded = load_tokenizer(path)
        differ = [f"{k} {getattr(loaded.cfg, k)} (the config asks for {getattr(tok.cfg, k)})"
                  for k in ("kind", "vocab", "patch_size", "in_chans", "norm_pix", "context")
                  if getattr(loaded.cfg, k) != getattr(tok.cfg, k)]
        if differ:
            raise ValueError(f"tokenizer {path} has {', '.join(differ)}")
        tok.load_state_dict(loaded.state_dict())
        log(f"tokenizer: loaded {path}")
        return
    log(f"tokenizer: none at {path}; training a {tok.cfg.kind} tokenizer ({tok.cfg.vocab} codes)")
    images = normalize(data.images, data.mean, data.std)
    trained = train_tokenizer(tok.cfg, images, log=log)
    stats = tokenizer_stats(trained, images[:10000])
    log(f"tokenizer: codebook usage {stats['codebook_usage']:.1%}, recon mse {stats['recon_mse']:.4f}")
    tok.load_state_dict(trained.state_dict())
    from imagelm import dist
    if not dist.world_size() > 1 or torch.distributed.get_rank() == 0:
        save_tokenizer(trained, path, stats)
