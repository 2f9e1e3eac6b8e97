"""The Trainer: the one loop for every method. It knows batches, losses and optimisers, never a
method's insides: `method(batch) -> Output(loss, metrics)`."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from imagelm import checkpoint, dist
from imagelm.config import Config, ConfigError, diff, drop_retired, from_dict
from imagelm.data import sources
from imagelm.data.loader import make_loader
from imagelm.methods import build_method


class TrainingDiverged(RuntimeError):
    pass


REFIT = 100     # steps between refits of the schedule to a --minutes budget


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with ($CXX, c++, g++, clang++), or None."""
    return next(filter(None, map(shutil.which, filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")))),
                None)


def check_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++ kernels: without a compiler, say so now, not in the first step."""
    if device.type == "cpu" and cpp_compiler() is None:
        raise ConfigError("train.compile=true on CPU needs a C++ compiler (install g++ or set CXX), "
                          "or pass train.compile=false")


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup over cfg.warmup of the steps, then cosine to cfg.min_lr."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """No weight decay on gains, biases and learned queries/embeddings (1-D or scalar tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def load_run_config(run: Path) -> Config:
    path = Path(run) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a run directory (no config.yaml)")
    return from_dict(drop_retired(yaml.safe_load(path.read_text())))


class Trainer:
    def __init__(self, cfg: Config, out: Path, minutes: float | None = None, resume: bool = False,
                 progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.deadline = time.time() + minutes * 60 if minutes else None   # the budget counts from here
        self.rank, self.world, self.device = dist.init()
        t = cfg.train
        if t.batch_size % (self.world * t.accum_steps):
            raise ConfigError(f"train.batch_size {t.batch_size} must be divisible by ranks x train.accum_steps "
                              f"= {self.world} x {t.accum_steps}")
        self.ckpt_root = self.out / "checkpoints"
        self._check_resume(resume)

        torch.manual_seed(t.seed)
        self.method = build_method(cfg).to(self.device)
        self.data = sources.load(cfg.data, cfg.model, "train")
        if self.data.skipped and self.rank == 0:
            print(f"skipped {self.data.skipped} unreadable images")
        if hasattr(self.method, "prepare"):   # fit (or, on resume, load) a tokenizer; tokenize the text
            self.method.prepare(sources.in_memory(self.data), self.out,   # streamed data: a bounded sample
                                log=print if self.rank == 0 else lambda *a: None)
        self.loader = make_loader(self.data, cfg.data, t.batch_size, t.seed, self.method.noise_dim,
                                  self.rank, self.world, self.device)
        self.opt = torch.optim.AdamW(param_groups(self.method, t.weight_decay), lr=t.lr, betas=t.betas,
                                     fused=True)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and dist.bf16_supported(self.device))
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext
        self.precision = "bf16" if use_bf16 else "fp32"
        self.step, self.total = 0, t.steps or max(1, round(t.epochs * self.loader.steps_per_epoch))
        self.planned = self.total    # what the config asks; --minutes fits the total below it
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.model = DDP(self.method) if self.world > 1 else self.method
        if t.compile:
            check_compiler(self.device)
            self.model = torch.compile(self.model)

    # --- run directory ----------------------------------------------------------------------------
    def _check_resume(self, resume: bool) -> None:
        cfg_path = self.out / "config.yaml"
        self.resume_from = checkpoint.latest(self.ckpt_root) if resume else None
        if resume and self.resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_root}")
        if self.resume_from is not None:
            old = load_run_config(self.out).to_dict()     # keys added since the run started: their defaults
            changed = diff(old, self.cfg.to_dict())
            if changed:
                raise ConfigError(f"refusing to resume {self.out}: the config differs in {', '.join(changed)} "
                                  f"(resume with the run's own config, or start a new --out)")
        elif checkpoint.latest(self.ckpt_root) is not None:
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or choose "
                                  f"another --out")
        if self.rank == 0 and not self.resume_from:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def _state(self) -> dict:
        return {"step": self.step, "total": self.total, "optimizer": self.opt.state_dict(),
                "rng_cpu": torch.get_rng_state()}

    def _load(self, ckpt: Path) -> None:
        self.method.load_state_dict(checkpoint.load_weights(ckpt))
        state = checkpoint.load_state(ckpt)
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.total = state["step"], state["total"]
        torch.set_rng_state(state["rng_cpu"])

    def save(self) -> Path | None:
        path = None
        if self.rank == 0:
            path = checkpoint.save(self.ckpt_root, self.step, self.method.state_dict(), self._state(),
                                   self.cfg.train.keep_ckpts)
        dist.barrier()
        return path

    # --- the loop ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        t = self.cfg.train
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.total, t)
        batch = self.loader.batch(step)
        micro = self.loader.local // t.accum_steps
        loss_sum, metrics = torch.zeros((), device=self.device), {}
        for i in range(t.accum_steps):
            mb = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
            last = i == t.accum_steps - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.model.no_sync()
            with sync, self.autocast():
                out = self.model(mb)
            (out.loss / t.accum_steps).backward()
            loss_sum += out.loss.detach() / t.accum_steps
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / t.accum_steps
        loss = dist.mean(loss_sum).item()
        if not math.isfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            last = checkpoint.latest(self.ckpt_root)
            raise TrainingDiverged(f"loss is {loss} at step {step}; stopped before the update. The last good "
                                   f"checkpoint is {last or 'none (no checkpoint was written yet)'}")
        gnorm = torch.nn.utils.clip_grad_norm_(self.method.parameters(), t.grad_clip) if t.grad_clip > 0 else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        row = {"loss": loss, "lr": self.opt.param_groups[0]["lr"], **metrics}
        if gnorm is not None:
            row["grad_norm"] = float(gnorm)
        return row

    def _fit_total(self, deadline: float, per_step: float) -> None:
        """Under --minutes: shorten the schedule to the steps that fit the time left, so the cosine
        decay ends when the budget does (measured on real steps; the total is saved with the run)."""
        fits = int(dist.mean(torch.tensor((deadline - time.time()) / per_step)).item())
        self.total = max(self.step + 1, min(self.planned, self.step + fits))

    def fit(self, until: int | None = None) -> Path | None:
        """Train to the end of the schedule, or until the time budget or step `until` (an
        interruption: the run can be resumed) is reached; checkpoint and return its path."""
        t0, deadline = time.time(), self.deadline
        writer = log_file = bar = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm
            writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step)
            log_file = open(self.out / "metrics.jsonl", "a")
            bar = tqdm(total=self.total, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                       desc=f"{self.cfg.method} {self.precision}")
            print(f"{self.cfg.method}: {sum(p.numel() for p in self.method.parameters()) / 1e6:.2f}M params, "
                  f"{self.total} steps of {self.cfg.train.batch_size} images "
                  f"({self.total / self.loader.steps_per_epoch:.2f} epochs), {self.world} rank(s), {self.precision}"
                  + (" (the steps are fitted to --minutes from step 20 on)" if deadline and self.step == 0 else ""))
        self.method.train()
        imgs, tick = 0, time.time()
        # under --minutes the schedule is fitted to the budget from the speed of steps 5-20 (the
        # first steps pay for allocation), then refitted every REFIT steps from the speed of the
        # last REFIT: steps can slow down as a run goes on, and a schedule that outlives the budget
        # stops before its learning rate has decayed
        fitting = bool(deadline) and self.step == 0
        mark = (self.step, time.time())
        try:
            while self.step < min(self.total, until or self.total):
                if fitting and (self.step == 5 or self.step == 20 or (self.step > 20 and self.step % REFIT == 0)):
                    if self.step > 5:
                        self._fit_total(deadline, (time.time() - mark[1]) / (self.step - mark[0]))
                        if bar is not None:
                            bar.total = self.total
                            bar.refresh()
                    mark = (self.step, time.time())
                stop = deadline is not None and time.time() > deadline
                if self.world > 1:   # every rank stops at the same step
                    stop = bool(dist.mean(torch.tensor(float(stop))).item() > 0)
                if stop:
                    break
                row = self.train_step(self.step)
                self.step += 1
                imgs += self.cfg.train.batch_size
                if self.rank == 0:
                    now = time.time()
                    row.update(step=self.step, epoch=self.step / self.loader.steps_per_epoch,
                               img_per_s=imgs / max(now - tick, 1e-9), time=now - t0)
                    if self.loader.skipped:   # unreadable samples replaced in this epoch (this rank)
                        row["data_skipped"] = self.loader.skipped.get((self.step - 1) // self.loader.steps_per_epoch, 0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}",
                                    **({"skipped": row["data_skipped"]} if "data_skipped" in row else {}))
                    if self.step % self.cfg.train.log_every == 0 or self.step == self.total:
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                        for k, v in row.items():
                            writer.add_scalar(f"train/{k}", v, self.step)
                        imgs, tick = 0, now
                if self.step % self.cfg.train.ckpt_every == 0 and self.step < self.total:
                    self.save()
        finally:
            self.loader.close()
            if self.rank == 0:
                bar.close()
                writer.close()
                log_file.close()
        path = self.save()
        if self.rank == 0:
            done = "finished" if self.step >= self.total else "stopped at the time budget"
            print(f"{done}: step {self.step}/{self.total}, checkpoint {path}")
        return path
